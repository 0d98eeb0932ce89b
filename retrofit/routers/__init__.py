"""Routers: who decides which (token, expert) pairs run. One module per router behind one interface
(:mod:`retrofit.routers.base`), one registry line each below."""

from retrofit.routers.base import SOFTMAX, Router, RouterSettings, Routing, RoutingContext, Scoring
from retrofit.routers.block import BlockRouter, BlockSettings
from retrofit.routers.ec import ExpertChoiceRouter, ExpertChoiceSettings
from retrofit.routers.registry import (
    ROUTERS,
    RouterField,
    build_router,
    register_router,
    router_settings,
    swap_routers,
)
from retrofit.routers.schedules import ScheduleSettings, expected_k, experts_per_token
from retrofit.routers.stats import RoutingStats, StatsByMaskRatio
from retrofit.routers.tc import TokenChoiceRouter, TokenChoiceSettings

register_router(TokenChoiceRouter)
register_router(ExpertChoiceRouter)
register_router(BlockRouter)

__all__ = [
    "ROUTERS",
    "SOFTMAX",
    "BlockRouter",
    "BlockSettings",
    "ExpertChoiceRouter",
    "ExpertChoiceSettings",
    "Router",
    "RouterField",
    "RouterSettings",
    "Routing",
    "RoutingContext",
    "RoutingStats",
    "StatsByMaskRatio",
    "ScheduleSettings",
    "Scoring",
    "TokenChoiceRouter",
    "TokenChoiceSettings",
    "build_router",
    "expected_k",
    "experts_per_token",
    "register_router",
    "router_settings",
    "swap_routers",
]
