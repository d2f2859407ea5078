"""A checkpoint folder's tokenizer.

transformers' AutoTokenizer is the reference, and it takes about a second to import. Where
tokenizer.json alone says how text is encoded and decoded (a generic fast tokenizer class, and no
setting in tokenizer_config.json that transformers would apply on top), the `tokenizers` library
loads that file directly, in milliseconds, and gives the same ids and text (tests/test_tokenizer.py
compares them). Everything else, and whatever needs more than encode and decode (a chat
template: mobile serve), loads through transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

from mobile.errors import CheckpointError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# classes that are tokenizer.json and nothing more; a model's own class may add rules of its own
GENERIC_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}
# tokenizer_config.json keys with which transformers changes what tokenizer.json does (their mere
# presence: an explicit add_bos_token false rewrites the post-processor too)
CHANGING_KEYS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "do_lower_case",
                 "split_special_tokens", "extra_special_tokens", "additional_special_tokens")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class FastTokenizer:
    """tokenizer.json through the `tokenizers` library: encode and decode, as transformers does them."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(ckpt_dir: Path, full: bool = False):
    """The folder's tokenizer: a FastTokenizer where tokenizer.json says it all, else (or with
    full: the whole transformers API, chat templates included) transformers' AutoTokenizer."""
    if not any((ckpt_dir / f).exists() for f in TOKENIZER_FILES):
        raise CheckpointError("no tokenizer in the checkpoint folder (expected tokenizer.json or "
                              "tokenizer.model); pass token ids with --prompt-ids instead", where=ckpt_dir)
    if not full and plain_tokenizer_json(ckpt_dir):
        try:
            return FastTokenizer(ckpt_dir / "tokenizer.json")
        except Exception as e:  # the library's own errors, one type per problem: all mean "cannot load it"
            raise CheckpointError(f"cannot load the tokenizer: {type(e).__name__}: {e}", where=ckpt_dir) from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here; all mean "cannot load it"
        raise CheckpointError(f"cannot load the tokenizer: {type(e).__name__}: {e}", where=ckpt_dir) from None


def plain_tokenizer_json(ckpt_dir: Path) -> bool:
    """Whether tokenizer.json alone decides encoding and decoding, as transformers would run it:
    a generic class, none of CHANGING_KEYS, no clean-up of spaces on decode, and every special
    token that tokenizer_config.json names marked special in tokenizer.json (transformers would
    skip it on decode)."""
    try:
        config = json.loads((ckpt_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokens = json.loads((ckpt_dir / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return False  # missing or unreadable: transformers decides, and explains
    if not isinstance(config, dict) or config.get("tokenizer_class") not in GENERIC_CLASSES:
        return False
    if any(key in config for key in CHANGING_KEYS) or config.get("clean_up_tokenization_spaces"):
        return False
    special = {t.get("content") for t in tokens if isinstance(t, dict) and t.get("special")}
    named = [config.get(key) for key in SPECIAL_KEYS]
    named = [t.get("content") if isinstance(t, dict) else t for t in named if t is not None]
    return all(t in special for t in named)
