"""Resolve ``--src``/``--model``: a registry name, a Hub id, or a local directory → a local checkpoint directory.

The registry names are the model families' (``retrofit.models``) plus the tiny models retrofit ships or makes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from retrofit.errors import RetrofitError
from retrofit.io.paths import cache_dir, looks_like_path
from retrofit.models import hub_models

# Names reserved for models that will ship inside the package.
EMBEDDED: dict[str, str] = {"tiny": "the embedded tiny pretrained model"}
# Models generated on first use into the cache: random weights, for trying the pipeline, not for quality.
GENERATED = {"tiny-random": "a tiny random-weight LLaDA-MoE (seed 0), generated on first use"}
# Pretrained models too large to ship, built into the cache by a documented command (name -> (what, command)).
BUILT: dict[str, tuple[str, str]] = {
    "small": ("the pretrained small LLaDA-MoE (64 experts, top-8)",
              "`make small` in a retrofit checkout (about 35 min on 2 CPU cores)"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what retrofit reads: config, safetensors weights, tokenizer. Never *.py (no remote code) or *.bin.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.tiktoken"]


@dataclass(frozen=True)
class Source:
    path: Path  # a local directory holding the checkpoint
    name: str  # short name for default output paths and model cards
    origin: str  # what the user asked for: registry name, Hub id or path
    # False for the models retrofit ships or generates: outputs copy their shards instead of hard-linking them,
    # so that writing into an output can never damage the model every later `--src tiny` reads.
    linkable: bool = True


def resolve_source(src: str, download=None, flag: str = "--src") -> Source | None:
    """Map ``src`` to a local directory, downloading a Hub snapshot when needed.

    ``download(repo_id, flag) -> path`` is injectable (tests; `validate`, which only looks in the cache and gets
    None when the snapshot is not there); by default it is huggingface_hub's snapshot fetch.
    ``flag`` is how the calling command names the option, for the error messages.
    """
    local = Path(src).expanduser()
    if local.is_dir():
        path = local.resolve()
        return Source(path=path, name=path.name, origin=src, linkable=not is_own_model(path))
    if src in GENERATED:
        return Source(path=_generated_path(src), name=src, origin=src, linkable=False)
    if src in BUILT:
        path = built_path(src)
        if not (path / "config.json").is_file():
            what, command = BUILT[src]
            raise RetrofitError(f"{flag} {src}: {what} is not built on this machine yet ({path}); build it with "
                                f"{command}")
        return Source(path=path, name=src, origin=src, linkable=False)
    if src in EMBEDDED:
        embedded = _embedded_path(src)
        if embedded is None:
            raise RetrofitError(f"{flag} {src}: {EMBEDDED[src]} is not built into this version yet; "
                                f"use tiny-random, or make one with `retrofit create-tiny DIR` and pass {flag} DIR")
        _check_intact(embedded, src)
        return Source(path=embedded, name=src, origin=src, linkable=False)
    registry = hub_models()
    repo_id = registry.get(src, src)
    if not _HUB_ID.match(repo_id) or looks_like_path(src) or _in_local_folder(src, registry):
        if looks_like_path(src) or _in_local_folder(src, registry):
            raise RetrofitError(f"{flag} {src}: no such directory{_what_is_there(local)}")
        names = ", ".join([*registry, *EMBEDDED, *BUILT, *GENERATED])
        raise RetrofitError(f"unknown {flag} {src!r}: use one of {names}, a Hub id (org/name), "
                            f"or a local directory ({flag} PATH)")
    path = (download or hub_snapshot)(repo_id, flag)
    if path is None:  # a download function that only looks in the cache found nothing
        return None
    name = src if src in registry else repo_id.split("/")[-1]
    return Source(path=Path(path), name=name, origin=src)


def _in_local_folder(src: str, registry: dict) -> bool:
    """``out/x`` where ``out`` is a folder here: a mistyped local path, not the Hub repository ``out/x``."""
    parent = Path(src).expanduser().parent
    return src not in registry and str(parent) not in ("", ".") and parent.is_dir()


def _what_is_there(path: Path) -> str:
    parent = path.parent
    if str(parent) in ("", ".") or not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f" ({parent}/ holds {shown})" if names else f" ({parent}/ is empty)"


def is_own_model(path: Path) -> bool:
    """Whether ``path`` is (inside) a model retrofit ships or generates, however the user named it."""
    path = Path(path).resolve()
    own = [Path(__file__).resolve().parent / "assets", *(_generated_root(name) for name in [*GENERATED, *BUILT])]
    return any(path == root or root in path.parents for root in own)


def _check_intact(path: Path, name: str) -> None:
    """A damaged embedded model cannot be downloaded again: say how to restore it instead."""
    from retrofit.io.safetensors_file import read_header

    for shard in sorted(path.glob("*.safetensors")):
        try:
            read_header(shard)
        except RetrofitError:
            raise RetrofitError(f"{EMBEDDED[name]} ({shard}) is damaged, probably written into through a hard link "
                                "an earlier retrofit made to it; restore it with `git checkout -- retrofit/assets` in "
                                "a checkout of retrofit, or `pip install --force-reinstall retrofit`") from None


def _embedded_path(name: str) -> Path | None:
    path = Path(__file__).resolve().parent / "assets" / name
    return path if (path / "config.json").is_file() else None


def _generated_root(name: str) -> Path:
    return (cache_dir() / f"{name}-v1").resolve()


def built_path(name: str) -> Path:
    """Where a model of ``BUILT`` lives once built (the cache, as the generated ones)."""
    return _generated_root(name)


def _generated_path(name: str) -> Path:
    from retrofit.tiny import create_tiny

    path = _generated_root(name)
    if not (path / "config.json").is_file():
        create_tiny(path, seed=0, force=path.exists())
    return path


def hub_snapshot(repo_id: str, flag: str = "--src") -> Path:
    """Download (or reuse the cache of) a Hub snapshot; any failure becomes one line that names ``flag`` PATH."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo, auth, disk full: all end the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # An org/name the user typed could also have been a local path (a registry name's Hub id could not).
        typed = repo_id not in hub_models().values()
        local = f", and there is no local directory {repo_id} either" if typed else ""
        raise RetrofitError(f"could not fetch {repo_id} from the Hugging Face Hub ({type(exc).__name__}: "
                            f"{reason[:160]}){local}; download it where the Hub is reachable and pass {flag} "
                            "PATH") from None
