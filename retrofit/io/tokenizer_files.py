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


def chat_template(model_dir: Path) -> str | dict | None:
    """The checkpoint's chat template, as transformers reads it: ``chat_template.jinja`` where there is one,
    else ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates); None when it has none
    (a base model). Read from the files, so a run is checked before its weights or tokenizer are loaded."""
    jinja = Path(model_dir) / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    path = Path(model_dir) / "tokenizer_config.json"
    template = json.loads(path.read_text()).get("chat_template") if path.is_file() else None
    if isinstance(template, list):  # named templates, as save_pretrained writes several
        return {t["name"]: t["template"] for t in template}
    return template or None


def require_chat_template(model_dir: Path) -> None:
    if chat_template(model_dir) is None:
        raise RetrofitError(f"{model_dir} has no chat template (no chat_template.jinja, none in "
                            "tokenizer_config.json): it is a base model's tokenizer; leave out "
                            "--apply-chat-template, or evaluate the Instruct checkpoint")


def write_chat_template(directory: Path, template: str | None) -> None:
    """Put ``template`` into ``tokenizer_config.json``, where the Hub snapshots of both families keep theirs (None:
    nothing to write)."""
    if template is None:
        return
    path = Path(directory) / "tokenizer_config.json"
    write_json(path, {**json.loads(path.read_text()), "chat_template": template})


def load_tokenizer(model_dir: Path):
    """The checkpoint's own fast tokenizer, read from tokenizer.json without consulting remote code."""
    from transformers import PreTrainedTokenizerFast

    require_tokenizer(model_dir)
    return PreTrainedTokenizerFast.from_pretrained(str(model_dir))
