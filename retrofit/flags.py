"""Command-line flags generated from registered settings classes (mergekit's pattern: the options come from the
model that validates them), for every seam that has a registry: routers (``routers/flags.py``) and samplers
(``eval/samplers.py``). Each command that takes them gets the same flags with the same help, and a new router's
or sampler's settings appear everywhere without touching the CLI.

A field ``capacity_factor`` becomes ``--capacity-factor``; a nested settings model is flattened: its ``name``
field takes the parent's flag (``schedule.name`` → ``--schedule``) and the others their own names, unless a
field sets ``json_schema_extra={"flag": ...}``. A flag shared by several owners (routers, samplers) is one flag.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from retrofit.errors import RetrofitError


@dataclass(frozen=True)
class Flag:
    dest: str  # the Python name of the option, e.g. "k_min"
    path: tuple[str, ...]  # where it goes in the settings, e.g. ("schedule", "k_min")
    owners: tuple[str, ...]  # the registered names (router types, samplers) whose settings have it
    kind: type  # int, float, bool or str
    choices: tuple[str, ...] | None
    description: str
    default: Any = None

    @property
    def flag(self) -> str:
        return "--" + self.dest.replace("_", "-")

    @property
    def routers(self) -> tuple[str, ...]:  # the router seam's name for the owners
        return self.owners

    @property
    def help(self) -> str:
        choices = f" One of: {', '.join(self.choices)}." if self.choices else ""
        shown = str(self.default).lower() if self.kind is bool else self.default
        default = "" if self.default is None else f" [default: {shown}]"
        return f"{'/'.join(self.owners)}: {self.description}.{choices}{default}"

    def typed(self, value):
        """``value`` as this flag's type (lm-eval's model_args arrive as strings; the command line's are typed)."""
        if value is None or isinstance(value, self.kind):
            return value
        try:
            return as_bool(value) if self.kind is bool else self.kind(value)
        except ValueError:
            raise RetrofitError(f"model_args {self.dest}={value!r}: expected {self.kind.__name__}") from None


def add_to_registry(registry: dict, cls):
    """Put a class with a ``kind`` and a ``settings_class`` (a router, a sampler) into its seam's ``registry``,
    after checking that the kind is the default ``type`` of its settings (the name a recipe or config selects
    it by)."""
    declared = cls.settings_class.model_fields["type"].default
    if not cls.kind or declared != cls.kind:
        raise ValueError(f"{cls.__name__}: kind {cls.kind!r} and its settings' type default {declared!r} must agree")
    registry[cls.kind] = cls
    return cls


def as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")


def _scalar(annotation) -> tuple[type, tuple[str, ...] | None]:
    """(int/float/bool/str, Literal choices) of a field's annotation; ``X | None`` counts as X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return str, tuple(typing.get_args(annotation))
    if args and typing.get_origin(annotation) is not Literal and len(args) == 1:
        return _scalar(args[0])
    if annotation in (int, float, bool, str):
        return annotation, None
    raise TypeError(f"settings field of type {annotation!r} has no command-line form")


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


def settings_flags(classes: dict[str, type[BaseModel]], seam: str) -> list[Flag]:
    """Every settings class's fields as flags, in registry order; a name shared by several owners is one flag
    (its type and path must agree). ``seam`` names the registry in errors ("router", "sampler")."""
    flags: dict[str, Flag] = {}
    for owner, cls in classes.items():
        for dest, path, info in _fields(cls):
            scalar, choices = _scalar(info.annotation)
            known = flags.get(dest)
            if known is None:
                flags[dest] = Flag(dest, path, (owner,), scalar, choices, info.description or dest,
                                   info.get_default(call_default_factory=True))
            elif (known.path, known.kind) != (path, scalar):
                raise TypeError(f"{seam} flag --{dest} means two things: {known.path} and {owner}'s {path}")
            else:
                flags[dest] = Flag(dest, path, known.owners + (owner,), scalar, known.choices, known.description,
                                   known.default)
    return list(flags.values())


def place(data: dict, flag: Flag, value) -> None:
    """Put ``value`` at ``flag``'s path in a settings mapping."""
    node = data
    for key in flag.path[:-1]:
        node = node.setdefault(key, {})
    node[flag.path[-1]] = value


def flag_of(flags: list[Flag], loc: tuple) -> str:
    """The flag a validation error's location names (``("schedule", "k_min")`` → ``--k-min``)."""
    loc = tuple(str(p) for p in loc)
    return next((f.flag for f in flags if f.path == loc), ".".join(loc))
