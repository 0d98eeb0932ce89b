"""The models the studies run on (``retrofit study NAME --model tiny|small``), with the settings that scale with
their routing geometry: the schedules' k range around top-k, the block router's guard sizes, the settings
fine-tuned, and the architecture the from-scratch study initialises."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StudyModel:
    name: str  # its --src name
    about: str  # what it is, for the READMEs' setup lines
    dims: dict  # its architecture, as create-tiny's arguments (the from-scratch study's initialisations)
    k_range: tuple[int, int]  # the capacity schedules' k(r) bounds, around its top-k
    guards: tuple[int, ...]  # the block router's guard sizes in the trade-off grid (at least top-k)
    tuned: tuple[tuple[float, int], ...]  # (core threshold, guard) settings the block study fine-tunes

    @property
    def top_k(self) -> int:
        return self.dims["top_k"]

    @property
    def experts(self) -> int:
        return self.dims["experts"]

    @property
    def source(self) -> str:
        """Its ``model.source``: a built model by its path, so that a folder of the same name beside a recipe (its
        reports: studies/<study>/small/) is never taken for it."""
        from retrofit.sources import built_path

        return self.name if self.name == "tiny" else str(built_path(self.name))

    @property
    def folder(self) -> str:
        """Where its reports go under ``studies/<study>/``: tiny's at the top (they came first), others beside."""
        return "" if self.name == "tiny" else self.name


STUDY_MODELS = {
    # `make tiny`: 8 experts top-2. k 1..3 around 2, as EC-DLM's 8..32 around its constant 20.
    "tiny": StudyModel("tiny", "the embedded 3-layer, 8-expert top-2 model",
                       {"hidden_size": 128, "layers": 3, "heads": 4, "experts": 8, "top_k": 2, "expert_size": 160},
                       (1, 3), (2, 3, 4), ((0.6, 2), (0.8, 3))),
    # `make small`: LLaDA-MoE's 64 experts top-8; dMoE's block router keeps at least 16 (guard 16, p 0.6).
    "small": StudyModel("small", "the 4-layer, 64-expert top-8 model of `make small`",
                        {"hidden_size": 128, "layers": 4, "heads": 4, "experts": 64, "top_k": 8, "expert_size": 64},
                        (4, 12), (8, 12, 16), ((0.6, 16), (0.8, 12))),
}
