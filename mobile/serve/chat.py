"""Chat messages -> a prompt's token ids.

When the checkpoint's tokenizer has a chat template (`chat_template` in tokenizer_config.json, or
chat_template.jinja), the template renders the messages and the opening of the assistant's turn.

When it has none (the demo has none), the plain fallback: one line per message, "Role: content",
then "Assistant:" for the model to continue:

    System: You answer in one line.
    User: Who was Moses?
    Assistant:

Roles are written System (also for "developer"), User and Assistant. The reply ends at the model's
stop token, or where it starts a user turn of its own: the fallback adds the stop string
"\\nUser:".
"""

from __future__ import annotations

FALLBACK_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_STOPS = ["\nUser:"]


class TemplateError(Exception):
    """The chat template refused the messages (many templates raise on roles out of order)."""


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def fallback_text(messages: list[dict]) -> str:
    lines = [f"{FALLBACK_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join([*lines, "Assistant:"])


def chat_prompt(tokenizer, messages: list[dict]) -> tuple[list[int], list[str]]:
    """messages: [{"role": system|developer|user|assistant, "content": str}] -> (prompt ids, the
    stop strings the format adds)."""
    if not has_template(tokenizer):
        return tokenizer.encode(fallback_text(messages)), list(FALLBACK_STOPS)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja's TemplateError and whatever a template raises: all mean "not these messages"
        raise TemplateError(f"the chat template refused the messages: {e}") from None
    # the template writes the special tokens it wants (a BOS among them): add none of our own
    return tokenizer.encode(text, add_special_tokens=False), []
