"""Command-line flags generated from the registered routers' settings classes (mergekit's pattern: the options
come from the model that validates them), so ``retrofit convert`` and ``retrofit eval`` accept exactly the same
router flags with the same help, and a new router's knobs appear in both without touching the CLI.

A field ``capacity_factor`` becomes ``--capacity-factor``; a nested settings model is flattened: its ``name``
field takes the parent's flag (``schedule.name`` → ``--schedule``) and the others their own names, unless a
field sets ``json_schema_extra={"flag": ...}``. A flag shared by several routers is one flag.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from retrofit.errors import RetrofitError
from retrofit.routers.base import RouterSettings
from retrofit.routers.registry import ROUTERS, UnknownRouter, router_settings


@dataclass(frozen=True)
class RouterFlag:
    dest: str  # the Python name of the option, e.g. "k_min"
    path: tuple[str, ...]  # where it goes in the settings, e.g. ("schedule", "k_min")
    routers: tuple[str, ...]  # router types that have it
    kind: type  # int, float, bool or str
    choices: tuple[str, ...] | None
    description: str
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def help(self) -> str:
        choices = f" One of: {', '.join(self.choices)}." if self.choices else ""
        default = "" if self.default is None else f" [default: {str(self.default).lower() if self.kind is bool else self.default}]"
        return f"{'/'.join(self.routers)}: {self.description}.{choices}{default}"


def _scalar(annotation) -> tuple[type, tuple[str, ...] | None]:
    """(int/float/bool/str, Literal choices) of a field's annotation; ``X | None`` counts as X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, tuple(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not Literal and len(args) == 1:
        return _scalar(args[0])
    if annotation in (int, float, bool, str):
        return annotation, None
    raise TypeError(f"router settings field of type {annotation!r} has no command-line form")


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> list[tuple[str, tuple[str, ...], Any]]:
    """(dest, path, FieldInfo) of every leaf field of a settings class, nested models flattened."""
    out = []
    for name, info in model.model_fields.items():
        if not prefix and name == "type":
            continue
        path = prefix + (name,)
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _fields(annotation, path)
            continue
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        dest = extra.get("flag") or (prefix[-1] if prefix and name == "name" else name)
        out.append((str(dest).replace("-", "_"), path, info))
    return out


def router_flags() -> list[RouterFlag]:
    """Every registered router's settings as flags, in registry order; a name shared by routers is one flag
    (its type and path must agree)."""
    flags: dict[str, RouterFlag] = {}
    for kind, router in ROUTERS.items():
        for dest, path, info in _fields(router.settings_class):
            scalar, choices = _scalar(info.annotation)
            known = flags.get(dest)
            if known is None:
                flags[dest] = RouterFlag(dest, path, (kind,), scalar, choices, info.description or dest,
                                         info.get_default(call_default_factory=True))
            elif (known.path, known.kind) != (path, scalar):
                raise TypeError(f"router flag --{dest} means two things: {known.path} and {kind}'s {path}")
            else:
                flags[dest] = RouterFlag(dest, path, known.routers + (kind,), scalar, known.choices,
                                         known.description, known.default)
    return list(flags.values())


def settings_from_flags(router: str | None, given: dict[str, Any], base: RouterSettings | None = None
                        ) -> RouterSettings | None:
    """Router settings from the flags a user gave (``given``: dest → value, unset ones absent or None).

    ``router`` names the router to install (None: keep ``base``'s type); settings of ``base`` carry over
    when the type stays the same. Returns None when nothing was asked for. A flag of another router than the
    chosen one is an error that names both.
    """
    given = {k: v for k, v in given.items() if v is not None}
    if router is None and not given:
        return None
    kind = router or (base.type if base is not None else "tc")
    if kind not in ROUTERS:
        raise UnknownRouter(f"unknown --router {kind!r}; use {', '.join(ROUTERS)}")
    data = base.model_dump() if base is not None and base.type == kind else {"type": kind}
    flags = {f.dest: f for f in router_flags()}
    for dest, value in given.items():
        flag = flags[dest]
        if kind not in flag.routers:
            raise RetrofitError(f"{flag.flag} is a setting of the {'/'.join(flag.routers)} router, not of {kind}; "
                                f"drop it or choose --router {flag.routers[0]}")
        node = data
        for key in flag.path[:-1]:
            node = node.setdefault(key, {})
        node[flag.path[-1]] = value
    try:
        return router_settings(data)
    except ValidationError as exc:  # named by the flag the user typed, not the settings' field path
        err = exc.errors()[0]
        loc = tuple(str(p) for p in err["loc"])
        where = next((f.flag for f in flags.values() if f.path == loc), ".".join(loc))
        raise RetrofitError(f"invalid {where}: {err['msg'].removeprefix('Value error, ')}") from None


def settings_per_router(routers: list[str], given: dict[str, Any]) -> list[RouterSettings | None]:
    """The settings of each named router (``retrofit inspect --router A --router B``), each taking the flags
    that are its own; ``[None]`` (the checkpoint's own) when none is named. A flag no named router has, or a
    flag with no router named, is an error."""
    given = {k: v for k, v in given.items() if v is not None}
    if given and not routers:
        raise RetrofitError("router flags need --router: name the router(s) they set")
    flags = {f.dest: f for f in router_flags()}
    for dest in given:
        if not set(flags[dest].routers) & set(routers):
            raise RetrofitError(f"{flags[dest].flag} is a setting of the {'/'.join(flags[dest].routers)} router, "
                                "which no --router names")
    return [settings_from_flags(name, {k: v for k, v in given.items() if name in flags[k].routers})
            for name in routers] or [None]
