"""The routers' command-line flags, generated from the registered routers' settings classes by
:mod:`retrofit.flags`, so ``retrofit convert``, ``eval`` and ``inspect`` accept exactly the same router flags with
the same help, and a new router's knobs appear in all of them without touching the CLI."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from retrofit.errors import RetrofitError
from retrofit.flags import Flag, flag_of, place, settings_flags
from retrofit.routers.base import RouterSettings
from retrofit.routers.registry import ROUTERS, UnknownRouter, router_settings

RouterFlag = Flag  # a router flag's owners are the router types that have it (``flag.routers``)


def router_flags() -> list[Flag]:
    """Every registered router's settings as flags, in registry order; a name shared by routers is one flag."""
    return settings_flags({kind: router.settings_class for kind, router in ROUTERS.items()}, "router")


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
        place(data, flag, value)
    try:
        return router_settings(data)
    except ValidationError as exc:  # named by the flag the user typed, not the settings' field path
        err = exc.errors()[0]
        where = flag_of(list(flags.values()), err["loc"])
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
