"""Where the tools find files that lie beside the checkout, not in the package (``../shared/data``, ``recipes/``).

Defaults are relative to the working directory (the repository root, where the Makefile runs them), never to
this package's files: an ordinary install puts those in site-packages, far from both.
"""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path("..") / "shared" / "data"
GSM8K_FILES = ("train.jsonl", "test.jsonl")


def gsm8k_problem(data_dir: Path) -> str | None:
    """Why ``data_dir`` cannot serve the tools' GSM8K (train text to fine-tune on, test text to measure on), as
    one line naming the flag that fixes it; None when both files are there."""
    hint = (f"pass --data-dir DIR holding gsm8k/{' and gsm8k/'.join(GSM8K_FILES)} (the default, {DATA_DIR}, "
            "is relative to the working directory)")
    if not data_dir.is_dir():
        return f"no data directory at {data_dir}; {hint}"
    for name in GSM8K_FILES:
        path = data_dir / "gsm8k" / name
        if not path.is_file():
            return f"no GSM8K {Path(name).stem} file at {path}; {hint}"
    return None


def recipe_problem(recipe: Path, target: str) -> str | None:
    """Why the checkout's ``recipe`` cannot be read from here, as one line; None when it can."""
    if recipe.is_file():
        return None
    return f"no {recipe} in {Path.cwd()}: run from the repository root, as `make {target}` does"
