"""What a user's argument means on disk: whether text names a path, and where a relative one is found."""

from __future__ import annotations

import os
from pathlib import Path

# Suffixes of the files retrofit reads by name (data files, recipes); a name ending in one is a file name.
FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".csv", ".yaml", ".yml")


def looks_like_path(text: str) -> bool:
    """True when ``text`` can only be a path (not a registry name, Hub id or Hub dataset name): it starts with
    ``.``, ``/`` or ``~``, has more than one ``/`` or a backslash, or ends in a data file's suffix."""
    return (text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text
            or Path(text).suffix.lower() in FILE_SUFFIXES)


def resolve_path(value: str, base: Path) -> Path | None:
    """An existing path: absolute as given, a relative one beside ``base`` (a recipe's directory) first, then
    in the working directory; None when there is none."""
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return candidate if candidate.exists() else None
    for root in (base, Path.cwd()):
        if (root / candidate).exists():
            return (root / candidate).resolve()
    return None


def cache_dir() -> Path:
    """retrofit's own cache (generated models, the weights-hash cache): $RETROFIT_CACHE or ~/.cache/retrofit."""
    return Path(os.environ.get("RETROFIT_CACHE", Path.home() / ".cache" / "retrofit")).expanduser()
