"""The one interface every router implements.

A router owns the gate weight of one MoE layer (Hub name ``mlp.gate.weight``, shape ``[E, d]``) and turns
hidden states into a :class:`Routing`: which (token, expert) pairs run, with which gate. Routers differ only
in *who chooses*. How the gate's logits become expert scores is the checkpoint's own :class:`Scoring`, which
the model family supplies (softmax for LLaDA-MoE), so a token-choice checkpoint's gate weights initialise any
router unchanged (docs/algorithms.md §4).

Adding a router is one module plus one registry line (``retrofit/routers/__init__.py``):

- a :class:`RouterSettings` subclass with ``type: Literal["<name>"]`` and one pydantic field per knob, each
  with a ``description`` (it becomes the help text of the ``--<field>`` flag that ``retrofit convert`` and
  ``retrofit eval`` both generate from the class, and it validates the ``router`` section of config.json and
  of recipes);
- a :class:`Router` subclass with ``kind = "<name>"``, ``settings_class`` set to that class, ``configure``
  when it reads its settings, and ``select`` (or ``route`` when it ranks something other than the scores).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn


class RouterSettings(BaseModel):
    """Base of every router's settings; the ``type`` field selects the router (see ``router_settings``)."""

    model_config = ConfigDict(extra="forbid")

    type: str

    def misfit(self, num_experts: int, top_k: int) -> str | None:
        """Why these settings make no sense on a model of ``num_experts`` experts and top-``top_k`` (e.g. block
        routing that keeps every expert, which is token choice), or None. Commands refuse such settings; the
        router itself still runs them (the parity tests take edge cases)."""
        return None

    def describe(self) -> str:
        """One-line human summary: the type and the fields that differ from their defaults."""
        changed = {k: v for k, v in self.model_dump(exclude_defaults=True).items() if k != "type"}
        return " ".join([self.type, *(f"{k}={v}" for k, v in changed.items())])


class Scoring:
    """A checkpoint's own scoring: how its gate logits become per-expert scores, and how its token-choice
    router turns scores into k experts and their gates. The model family supplies it; every router ranks and
    gates with :meth:`scores`, so a router swap changes who chooses, never the scale of the scores.

    - ``logits_dtype``: the least dtype the gate's matmul runs in (None: the activations'; LLaDA2.0's: fp32);
    - ``uses_expert_bias``: the router holds an ``expert_bias`` ``[E]`` that biases *selection* only (:meth:`selection`);
    - ``renormalizes``: its token choice's gates already sum to a fixed total (a router does not renormalise again).

    This class is LLaDA-MoE's: an fp32 softmax over all experts, top-k of it, raw (not renormalised) gates.
    """

    name: ClassVar[str] = "softmax"
    logits_dtype: ClassVar[torch.dtype | None] = None
    uses_expert_bias: ClassVar[bool] = False
    renormalizes: ClassVar[bool] = False

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., E]`` logits → fp32 scores (the gate values)."""
        return F.softmax(logits, dim=-1, dtype=torch.float32)

    def selection(self, scores: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The scores experts are *chosen* by (the gate values plus the expert bias, where there is one)."""
        return scores if bias is None else scores + bias.float()

    def top_k(self, scores: torch.Tensor, k: int, bias: torch.Tensor | None = None,
              allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The checkpoint's own token choice: ``scores`` ``[..., E]`` → (gates ``[..., k]``, experts ``[..., k]``),
        choosing only among ``allowed`` experts (bool, broadcastable) when given."""
        ranked = scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))
        _, experts = ranked.topk(k, dim=-1)
        return scores.gather(-1, experts), experts

    def gate_scale(self, scores: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per token ``[..., 1]``: what turns a score into the gate the token's own token choice gives it (its
        renormalisation and scale); None when gates are the scores themselves (softmax)."""
        return None

    def __repr__(self) -> str:
        return self.name


SOFTMAX = Scoring()


@dataclass
class RoutingContext:
    """Per-forward facts a router may need besides the hidden states.

    ``valid``: ``[B, L]`` bool, False at padding (padding is never routed to an expert by EC/block and never
    counted in statistics). ``mask_ratio``: ``[B]`` float in [0, 1], the observed (inference) or sampled
    (training) fraction of masked positions among the *maskable* ones of each sequence (the generation region
    in the sampler, the continuation in likelihood scoring, never a prompt); timestep-dependent capacity reads
    it. ``block_start``: the position where denoising blocks begin (the prompt's length in the sampler), so
    that block routing cuts its blocks exactly where the sampler does; positions before it form blocks of
    their own, the last of them ending at ``block_start``.
    """

    valid: torch.Tensor
    mask_ratio: torch.Tensor
    block_start: int = 0
    focus: torch.Tensor | None = None  # [B, L] bool: the positions being denoised (statistics only)
    padded: bool = True  # False: every position is valid, known without reading ``valid`` (no attention mask)
    # (masked, maskable) counts ``[B]`` behind an observed ``mask_ratio`` (None when it was given, e.g. sampled t
    # in training): schedules round k exactly from them.
    mask_counts: tuple[torch.Tensor, torch.Tensor] | None = None
    # The forward's key/value cache (``retrofit.models.kv_cache.BlockCache``), where a denoising sampler keeps one:
    # a router that chooses among a sequence's tokens remembers its choice there at a refresh, for the cached
    # steps that compute only a span of the sequence.
    cache: object | None = None
    _host: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def unpadded(cls, batch: int, length: int, device=None) -> "RoutingContext":
        return cls(
            valid=torch.ones(batch, length, dtype=torch.bool, device=device),
            mask_ratio=torch.zeros(batch, device=device),
            padded=False,
        )

    def narrowed(self, span: slice) -> "RoutingContext":
        """The context of the columns ``span`` only (a cached denoising step computes just those): their padding
        and focus, the block start counted from the span's first column; the mask ratio stays the sequence's."""
        return RoutingContext(valid=self.valid[:, span], mask_ratio=self.mask_ratio,
                              block_start=self.block_start - span.start,
                              focus=None if self.focus is None else self.focus[:, span], padded=self.padded,
                              mask_counts=self.mask_counts, cache=self.cache)

    def lengths_on_host(self) -> torch.Tensor:
        """Each sequence's valid length, a long CPU tensor ``[B]``. Shapes that depend on it (EC's capacities) need
        it on the host: it is brought there at most once per forward, whatever the number of layers, and not at
        all (no synchronisation with a GPU) when nothing is padded."""
        if "lengths" not in self._host:
            batch, length = self.valid.shape
            self._host["lengths"] = (self.valid.sum(-1).cpu() if self.padded
                                     else torch.full((batch,), length, dtype=torch.long))
        return self._host["lengths"]

    def mask_counts_on_host(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``mask_counts`` on the host (one transfer per forward), or None."""
        if self.mask_counts is None:
            return None
        if "mask_counts" not in self._host:
            self._host["mask_counts"] = tuple(c.detach().cpu() for c in self.mask_counts)
        return self._host["mask_counts"]

    def mask_ratio_on_host(self) -> torch.Tensor:
        """``mask_ratio`` on the host, brought there at most once per forward (timestep-dependent capacity)."""
        if "mask_ratio" not in self._host:
            self._host["mask_ratio"] = self.mask_ratio.detach().cpu()
        return self._host["mask_ratio"]


@dataclass
class Routing:
    """Which (token, expert) pairs run, and with which gate.

    Token indices are flat positions in the ``[B * L]`` token list of the forward pass. One of two layouts:

    - ``layout == "token"`` (TC, block): ``indices[T, k]`` are expert ids chosen by each of the T tokens and
      ``gates[T, k]`` their weights. Every token, padding included, has exactly k entries.
    - ``layout == "expert"`` (EC): ``indices[E, C]`` are token ids chosen by each expert and ``gates[E, C]``
      their weights; C is the total capacity of one expert over the batch (sum of per-sequence capacities).

    ``logits`` (``[T, E]``, the gate's raw output) is kept for auxiliary losses such as the router z-loss.
    ``capacity`` (EC only) is each sequence's per-expert capacity C_b, for statistics. ``keep`` (``[E, C]`` bool,
    expert layout only): the pairs that are chosen, where the layout lists more (their gates are 0, so they add
    nothing; statistics count only the chosen).
    """

    layout: Literal["token", "expert"]
    indices: torch.Tensor
    gates: torch.Tensor
    num_experts: int
    logits: torch.Tensor | None = None
    capacity: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat ``(token, expert, gate)`` triples, the layout-free view used by statistics and tests."""
        if self.layout == "token":
            num_tokens, k = self.indices.shape
            tokens = torch.arange(num_tokens, device=self.indices.device).repeat_interleave(k)
            return tokens, self.indices.reshape(-1), self.gates.reshape(-1)
        num_experts, capacity = self.indices.shape
        experts = torch.arange(num_experts, device=self.indices.device).repeat_interleave(capacity)
        tokens, gates = self.indices.reshape(-1), self.gates.reshape(-1)
        if self.keep is None:
            return tokens, experts, gates
        keep = self.keep.reshape(-1)
        return tokens[keep], experts[keep], gates[keep]


class Router(nn.Module):
    """Base class: holds the gate weight and the checkpoint's scoring every router shares.

    Subclasses set ``kind`` and ``settings_class`` and implement :meth:`select`, a pure function of the fp32
    scores, so that it can be checked against a slow loop reference on random inputs.
    """

    kind: ClassVar[str] = ""
    settings_class: ClassVar[type[RouterSettings]] = RouterSettings

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, settings: RouterSettings | None = None,
                 scoring: Scoring = SOFTMAX):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.settings = settings if settings is not None else self.settings_class(type=self.kind)
        if not isinstance(self.settings, self.settings_class):
            raise TypeError(f"{type(self).__name__} needs {self.settings_class.__name__}, got "
                            f"{type(self.settings).__name__}")
        self.scoring = scoring
        # Same name, shape and orientation as the checkpoint's nn.Linear(d, E, bias=False).weight.
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if scoring.uses_expert_bias:  # a checkpoint tensor (``mlp.gate.expert_bias``), never trained here
            self.register_buffer("expert_bias", torch.zeros(num_experts))
        self.configure(self.settings)

    def configure(self, settings: RouterSettings) -> None:
        """Take what the router needs from its settings, refusing (ValueError) what this layer cannot honour."""

    def adopt(self, other: "Router") -> None:
        """Share ``other``'s tensors (the gate weight, and any other tensor both routers hold): a router swap
        keeps the checkpoint's weights and changes only who chooses."""
        for name, param in other.named_parameters(recurse=False):
            if hasattr(self, name):
                setattr(self, name, param)
        for name, buffer in other.named_buffers(recurse=False):
            if hasattr(self, name):
                setattr(self, name, buffer)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # A router that trains may keep an fp32 master weight beside bf16 activations: compute in the
        # activations' dtype (a no-op cast when they agree, so the checkpoint's own routing stays bit-exact),
        # or in the dtype the checkpoint's own gate uses (at least: a float64 model keeps float64).
        floor = self.scoring.logits_dtype
        dtype = torch.promote_types(hidden.dtype, floor) if floor is not None else hidden.dtype
        return F.linear(hidden.to(dtype), self.weight.to(dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        """The expert bias selection adds to the scores, where the checkpoint has one."""
        return getattr(self, "expert_bias", None)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The checkpoint's fp32 scores of ``logits`` (softmax over all experts for LLaDA-MoE)."""
        return self.scoring.scores(logits)

    def forward(self, hidden: torch.Tensor, ctx: RoutingContext) -> Routing:
        """``hidden``: ``[B, L, d]`` → :class:`Routing` over the ``B * L`` flat tokens."""
        logits = self.logits(hidden)
        routing = self.route(logits, ctx)
        routing.logits = logits.reshape(-1, self.num_experts)
        return routing

    def route(self, logits: torch.Tensor, ctx: RoutingContext) -> Routing:
        """The gate's logits ``[B, L, E]`` → :class:`Routing`; by default :meth:`select` on the fp32 scores."""
        return self.select(self.probabilities(logits), ctx)

    def select(self, probs: torch.Tensor, ctx: RoutingContext) -> Routing:
        """``probs``: fp32 ``[B, L, E]`` → :class:`Routing`."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"kind={self.kind}, experts={self.num_experts}, top_k={self.top_k}, scoring={self.scoring}"
