"""Tokenizer files: which ones travel with a checkpoint, the mask token's id, and loading the tokenizer
(the tokenizers of tiny models are made in ``retrofit.tiny.tokenizers``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from retrofit.errors import RetrofitError
from retrofit.io.writer import write_json

MASK_TOKEN = "<|mask|>"
EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


def tokenizer_files(directory: Path) -> list[Path]:
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def copy_tokenizer_files(src: Path, dest: Path) -> None:
    """The tokenizer files of ``src`` into ``dest``; an ``auto_map`` in tokenizer_config.json is dropped, as
    from config.json, so that ``AutoTokenizer`` on the output never asks to run remote code."""
    for path in tokenizer_files(src):
        if path.name == "tokenizer_config.json":
            data = json.loads(path.read_text())
            if "auto_map" in data:
                del data["auto_map"]
                write_json(dest / path.name, data)
                continue
        shutil.copyfile(path, dest / path.name)


def mask_token_id(directory: Path) -> int | None:
    """The id of ``<|mask|>`` in the directory's tokenizer.json, which config.json does not carry."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    for token in data.get("added_tokens", []):
        if token.get("content") == MASK_TOKEN:
            return int(token["id"])
    vocab = (data.get("model") or {}).get("vocab") or {}
    return vocab.get(MASK_TOKEN) if isinstance(vocab, dict) else None


def require_tokenizer(model_dir: Path) -> None:
    if not (Path(model_dir) / "tokenizer.json").is_file():
        raise RetrofitError(f"{model_dir} has no tokenizer.json; retrofit needs the checkpoint's fast tokenizer "
                            "(copy the tokenizer files of the checkpoint's Hub snapshot into it)")


def load_tokenizer(model_dir: Path):
    """The checkpoint's own fast tokenizer, read from tokenizer.json without consulting remote code."""
    from transformers import PreTrainedTokenizerFast

    require_tokenizer(model_dir)
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
