"""Token ids -> text as it becomes final, cut at the first stop string (`mobile serve`'s streams and
`mobile run`'s plain output)."""

from __future__ import annotations

from collections.abc import Iterable


class TextStream:
    """Incremental detokenization with stop strings, for one request.

    A token decoded alone can give the wrong text (a word piece's leading space, half of a UTF-8
    character), so each step decodes a short window of the tokens before it too, and takes what
    the new token added; text that ends in an incomplete character waits for the next token (the
    method of vLLM's and TGI's detokenizers). Text that could be the start of a stop string is held
    back until it is known not to be one. A stop string ends the text and is not part of it; nor is
    a stop token, nor any special token.
    """

    def __init__(self, tokenizer, stop_strings: Iterable[str] = (), stop_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.stops, self.stop_ids = list(stop_strings), set(stop_ids)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read]: the context window already turned into text
        self.text = ""  # the text so far, cut at a stop string
        self.sent = 0  # how much of it push() and finish() have returned
        self.tokens = 0  # tokens taken, the stop token included (the request's completion tokens)
        self.done = False  # a stop string or a stop token ended the text

    def push(self, token: int) -> str:
        """Take one new token; returns the text that is final now (often "", sometimes several characters)."""
        if self.done:
            return ""
        self.tokens += 1
        if token in self.stop_ids:
            out = self.finish()
            self.done = True
            return out
        self.ids.append(token)
        self._decode(final=False)
        return self._emit(final=False)

    def finish(self) -> str:
        """The generation ended: the rest of the text, held-back characters included."""
        if self.done:  # cut at a stop string already: what follows it is not part of the text
            return ""
        self._decode(final=True)
        return self._emit(final=True)

    def _decode(self, final: bool) -> None:
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)

    def _emit(self, final: bool) -> str:
        if self.stops:  # not done here: push and finish return early once it is
            # a stop string cannot start before `sent`: text that could begin one was held back
            found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
            if found:
                self.text, self.done, final = self.text[:min(found)], True, True
        end = len(self.text) if final else len(self.text) - self._held()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _held(self) -> int:
        """Characters at the end of the text that begin some stop string (and so must wait)."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.text) - self.sent), longest, -1):
                if self.text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
