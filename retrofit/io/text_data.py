"""Text data for training and held-out evaluation: text or prompt/response records → fixed-length token sequences.

- ``pretrain``: every record's text field is tokenised, followed by EOS, concatenated and cut into
  ``seq_len`` chunks; every position is maskable.
- ``sft``: prompt + response + EOS, padded with EOS to ``seq_len`` (LLaDA trains on EOS padding) or cut;
  only response positions (EOS padding included) are maskable, the prompt never is.

Records come through ``datasets`` (local files by extension, or a Hub dataset name), so tokenisation is
cached by ``datasets`` between runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from retrofit.errors import RetrofitError
from retrofit.io.paths import looks_like_path, resolve_path

_BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".parquet": "parquet", ".csv": "csv"}


class DataSection(BaseModel):
    """The ``data`` section of a recipe: where the text is and how it becomes sequences."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="local file (jsonl, json, txt, parquet, csv) or a Hub dataset name")
    format: Literal["auto", "json", "text", "parquet", "csv"] = "auto"
    split: str = "train"
    objective: Literal["pretrain", "sft"] = "pretrain"
    text_field: str | list[str] = Field(default="text", description="field, or fields joined by newlines")
    prompt_field: str = "question"
    response_field: str = "answer"
    seq_len: int = Field(default=256, ge=8)
    max_examples: int | None = Field(default=None, ge=1)


@dataclass
class TokenBatches:
    """``input_ids`` ``[N, seq_len]`` and ``prompt_len`` ``[N]`` (0 for pretraining)."""

    input_ids: torch.Tensor
    prompt_len: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def load_records(section: DataSection, recipe_dir: Path):
    import datasets

    datasets.disable_progress_bars()
    local = resolve_path(section.path, recipe_dir)
    try:
        if local is not None:
            builder = section.format if section.format != "auto" else _BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise RetrofitError(f"data.path {local}: cannot tell the format from '{local.suffix}'; set "
                                    f"data.format to one of json, text, parquet, csv")
            check_data_file(local)
            records = datasets.load_dataset(builder, data_files=str(local), split="train")
        elif looks_like_path(section.path):
            raise RetrofitError(f"data file not found: {section.path} (looked beside the recipe and in the "
                                "working directory)")
        else:
            records = datasets.load_dataset(section.path, split=section.split)
    except RetrofitError:
        raise
    except Exception as exc:
        raise RetrofitError(f"cannot load data {section.path}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}") from None
    if len(records) == 0:
        raise RetrofitError(f"data {section.path} is empty")
    if section.max_examples:
        records = records.select(range(min(section.max_examples, len(records))))
    return records


def check_data_file(path: Path) -> None:
    """What `datasets` reports badly (an empty file as StopIteration, a bad JSON line with its row number in a
    separate log line, bytes that are not UTF-8 as a decoding traceback), said in one line with the file and
    line number. Text formats are read once here; parquet is left to `datasets`."""
    if not path.is_file():
        raise RetrofitError(f"data file {path} is not a file")
    if path.stat().st_size == 0:
        raise RetrofitError(f"data file {path} is empty")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".txt", ".csv"):
        return
    documents = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RetrofitError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                    f"{exc.start + 1}); convert the file to UTF-8") from None
            if suffix == ".jsonl" and line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise RetrofitError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); a "
                                        ".jsonl file holds one JSON document per line") from None
            documents += bool(line.strip())
    if not documents:
        raise RetrofitError(f"data file {path} is empty")


def _require_fields(records, fields: list[str], path: str,
                    hint: str = "set data.text_field / prompt_field / response_field") -> None:
    missing = [f for f in fields if f not in records.column_names]
    if missing:
        raise RetrofitError(f"data {path} has no field {', '.join(missing)} (fields: "
                            f"{', '.join(records.column_names)}); {hint}")


def read_texts(path: Path, fields: list[str], hint: str) -> list[str]:
    """The ``fields`` of every record of a local data file, joined by newlines (as the pretrain objective joins
    them); ``hint`` says how the caller's user names the fields."""
    if not Path(path).is_file():
        raise RetrofitError(f"data file not found: {path}")
    records = load_records(DataSection(path=str(Path(path).resolve()), text_field=fields), Path.cwd())
    _require_fields(records, fields, str(path), hint)
    return ["\n".join(str(v) for v in parts) for parts in zip(*(records[f] for f in fields))]


def build_sequences(section: DataSection, recipe_dir: Path, tokenizer) -> TokenBatches:
    records = load_records(section, recipe_dir)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise RetrofitError("the tokenizer has no EOS token")
    if section.objective == "pretrain":
        fields = [section.text_field] if isinstance(section.text_field, str) else section.text_field
        _require_fields(records, fields, section.path)

        def encode_text(batch):
            texts = ["\n".join(parts) for parts in zip(*(batch[f] for f in fields))]
            return {"ids": [ids + [eos] for ids in tokenizer(texts)["input_ids"]]}

        tokens = records.map(encode_text, batched=True, remove_columns=records.column_names)
        flat = torch.tensor([t for ids in tokens["ids"] for t in ids], dtype=torch.long)
        count = flat.numel() // section.seq_len
        if count == 0:
            raise RetrofitError(f"data {section.path} has {flat.numel()} tokens, fewer than one sequence of "
                                f"data.seq_len={section.seq_len}")
        ids = flat[: count * section.seq_len].view(count, section.seq_len)
        return TokenBatches(ids, torch.zeros(count, dtype=torch.long))
    _require_fields(records, [section.prompt_field, section.response_field], section.path)

    def encode(batch):
        prompts = tokenizer(batch[section.prompt_field])["input_ids"]
        responses = tokenizer(batch[section.response_field])["input_ids"]
        return {"prompt": prompts, "response": [r + [eos] for r in responses]}

    tokens = records.map(encode, batched=True, remove_columns=records.column_names)
    rows, prompt_lens = [], []
    for prompt, response in zip(tokens["prompt"], tokens["response"]):
        if len(prompt) >= section.seq_len:
            continue  # no room for a response: nothing to learn from this record
        row = (prompt + response)[: section.seq_len]
        rows.append(row + [eos] * (section.seq_len - len(row)))
        prompt_lens.append(len(prompt))
    if not rows:
        raise RetrofitError(f"every prompt in {section.path} is longer than data.seq_len={section.seq_len}")
    return TokenBatches(torch.tensor(rows, dtype=torch.long), torch.tensor(prompt_lens, dtype=torch.long))
