"""The README.md model card of every model directory retrofit writes (convert, finetune, the embedded tiny),
with Hub metadata that ``huggingface_hub`` reads back: library, base model, tags."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData


def model_card(title: str, body: str, base_model: str | None = None, tags: list[str] | None = None) -> str:
    """Front matter + ``# title`` + ``body``. ``base_model`` is kept only when it is a Hub id (a local path
    would be a meaningless, possibly private, reference)."""
    hub_id = base_model if base_model and base_model.count("/") == 1 and not Path(base_model).exists() else None
    data = ModelCardData(library_name="retrofit", base_model=hub_id, tags=["retrofit", *(tags or [])])
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n# {title}\n\n{body.strip()}\n"))
