"""Router settings: one pydantic model, stored as the ``router`` section of a converted config.json.

The same model validates CLI flags, config files and (later) recipes, so a misspelled key or an impossible
value is caught in one place with one message.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RouterKind = Literal["tc", "ec", "block"]
ScheduleName = Literal[
    "constant",
    "linear",
    "linear-reverse",
    "cosine",
    "cosine-reverse",
    "bell",
    "gaussian",
    "gaussian-reverse",
    "step",
    "step-reverse",
]


class ScheduleSettings(BaseModel):
    """Capacity as a function of the mask ratio r (algorithms.md §5).

    k(r) = round(k_min + (k_max - k_min) * s(r)), clamped to [k_min, k_max]; ``None`` bounds default to the
    checkpoint's top-k. ``constant`` ignores r and uses the checkpoint's top-k.
    """

    model_config = ConfigDict(extra="forbid")

    name: ScheduleName = "constant"
    k_min: int | None = Field(default=None, ge=0)
    k_max: int | None = Field(default=None, ge=1)
    sigma: float = Field(default=0.22, gt=0, description="width of the gaussian bell")
    threshold: float = Field(default=0.5, ge=0, le=1, description="where the step schedules switch")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> "ScheduleSettings":
        if self.k_min is not None and self.k_max is not None and self.k_min > self.k_max:
            raise ValueError(f"schedule k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        return self


class RouterSettings(BaseModel):
    """Which router a model uses and how it is tuned. Fields of other routers are ignored by each router."""

    model_config = ConfigDict(extra="forbid")

    type: RouterKind = "tc"
    # Expert choice (algorithms.md §4, §5)
    capacity_factor: float = Field(default=1.0, gt=0)
    per_batch: bool = Field(default=False, description="experts choose over the whole batch, not per sequence")
    schedule: ScheduleSettings = Field(default_factory=ScheduleSettings)
    ec_order: Literal["softmax-then-topk", "topk-then-softmax"] = Field(default="softmax-then-topk", description=(
        "softmax-then-topk: experts rank tokens by softmax probability, gate = that probability; "
        "topk-then-softmax (EC-DLM's default): experts rank tokens by raw router logit, gate = softmax over the "
        "logits of just the experts that chose the token"))
    # Block-level routing (algorithms.md §6)
    block_length: int = Field(default=32, ge=1)
    core_threshold: float = Field(default=0.6, gt=0, le=1)
    guard_size: int = Field(default=16, ge=1)
    renormalize: bool = Field(default=False, description=(
        "renormalise each token's k gates over its k experts (dMoE's LLaDA2.0 router does); off by default to "
        "keep LLaDA-MoE's own convention of raw softmax gates, which sets the scale of every MoE output"))

    def describe(self) -> str:
        """One-line human summary of the settings that matter for this router type."""
        if self.type == "ec":
            s = self.schedule
            sched = s.name if s.name == "constant" else f"{s.name}[{s.k_min}..{s.k_max}]"
            scope = "batch" if self.per_batch else "sequence"
            order = "" if self.ec_order == "softmax-then-topk" else f" {self.ec_order}"
            return f"ec capacity_factor={self.capacity_factor} schedule={sched} per-{scope}{order}"
        if self.type == "block":
            return (
                f"block block_length={self.block_length} core_threshold={self.core_threshold} "
                f"guard_size={self.guard_size}"
            )
        return "tc (checkpoint top-k)"
