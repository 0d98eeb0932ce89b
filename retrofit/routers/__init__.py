"""Routers: who decides which (token, expert) pairs run. One module per router behind one interface."""

from retrofit.routers.base import Router, Routing, RoutingContext
from retrofit.routers.block import BlockRouter
from retrofit.routers.ec import ExpertChoiceRouter
from retrofit.routers.schedules import expected_k, experts_per_token
from retrofit.routers.settings import RouterSettings, ScheduleSettings
from retrofit.routers.stats import RoutingStats
from retrofit.routers.tc import TokenChoiceRouter

ROUTERS: dict[str, type[Router]] = {
    "tc": TokenChoiceRouter,
    "ec": ExpertChoiceRouter,
    "block": BlockRouter,
}


def build_router(settings: RouterSettings, hidden_size: int, num_experts: int, top_k: int) -> Router:
    """A fresh router of the configured kind (its gate weight uninitialised: the caller loads or copies it)."""
    return ROUTERS[settings.type](hidden_size, num_experts, top_k, settings)


__all__ = [
    "ROUTERS",
    "BlockRouter",
    "ExpertChoiceRouter",
    "Router",
    "RouterSettings",
    "Routing",
    "RoutingContext",
    "RoutingStats",
    "ScheduleSettings",
    "TokenChoiceRouter",
    "build_router",
    "expected_k",
    "experts_per_token",
]
