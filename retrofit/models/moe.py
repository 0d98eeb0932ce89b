"""The MoE layer every family builds on: a swappable router (``gate``) over stacked experts.

Experts are stored stacked (``experts.{gate,up}_proj`` ``[E, f, d]``, ``down_proj`` ``[E, d, f]``) so expert
choice runs every expert as one batched matmul; checkpoints name each expert's weights separately
(``mlp.experts.N.gate_proj.weight``), and :func:`parse_expert_key`, :func:`stack_expert_tensors` and
:func:`unstack_expert_tensors` map between the two.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from retrofit.errors import RetrofitError
from retrofit.routers import Router, RouterSettings, RoutingContext, RoutingStats, Scoring, build_router

GROUPED_MM = hasattr(F, "grouped_mm")  # torch >= 2.8 (CUDA bf16 on SM >= 80; CPU fp32/bf16)
GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class StackedExperts(nn.Module):
    """All experts of a layer as three stacked tensors; ``gate_proj[e]`` is expert e's ``[f, d]`` weight."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, slot_sum_fp32: bool = False):
        super().__init__()
        # Token layout (TC, block): "loop" runs expert by expert in the reference's order (bit-exact, and what
        # a CPU and fp64 use); "grouped" runs all experts as three grouped GEMMs over the pairs sorted by expert,
        # offsets on the device, no host synchronisation; "auto" picks grouped where torch's grouped_mm runs
        # (CUDA, bf16), the loop elsewhere.
        self.kernel = "auto"
        # How a token's k expert outputs are combined in token layout (TC, block), each family as its reference
        # does it: LLaDA-MoE scales each output by its gate in the activations' dtype and adds it in place,
        # expert by expert; LLaDA2.0 (``slot_sum_fp32``) scales the k outputs in fp32 and sums them over the
        # slots in fp32, then casts once.
        self.slot_sum_fp32 = slot_sum_fp32
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, routing) -> torch.Tensor:
        """``x``: ``[T, d]`` flat tokens → ``[T, d]`` gated sum of the chosen experts' outputs."""
        if routing.layout == "expert":
            return self._expert_major(x, routing.indices, routing.gates)
        if self.uses_grouped(x):
            return self._token_major_grouped(x, routing.indices, routing.gates)
        if self.slot_sum_fp32:
            return self._token_major_slot_sum(x, routing.indices, routing.gates)
        return self._token_major(x, routing.indices, routing.gates)

    def pair_order(self, experts: torch.Tensor) -> torch.Tensor:
        """The flat (token · k + slot) positions of the routed pairs sorted by expert, as each family's reference
        runs them: LLaDA2.0 (``slot_sum_fp32``) by (token, slot) within an expert; LLaDA-MoE by slot, then token
        (the order torch.where gives its reference's [E, k, T] expert mask)."""
        num_tokens, k = experts.shape
        flat = experts.reshape(-1)
        if self.slot_sum_fp32:
            return torch.argsort(flat, stable=True)
        slot = torch.arange(k, device=experts.device).repeat(num_tokens)
        token = torch.arange(num_tokens, device=experts.device).repeat_interleave(k)
        return torch.argsort((flat * k + slot) * num_tokens + token)

    def uses_grouped(self, x: torch.Tensor) -> bool:
        """Whether this forward runs the grouped GEMMs. On a CPU the loop stays the default: it is the reference's
        order, and measured at LLaDA-MoE size neither is faster there (README, `make bench`)."""
        if self.kernel == "grouped":
            if not GROUPED_MM or x.dtype not in GROUPED_DTYPES:
                raise RetrofitError(f"grouped expert GEMMs need torch.nn.functional.grouped_mm (torch >= 2.8) and "
                                    f"fp32/bf16/fp16 activations (this torch: {torch.__version__}, {x.dtype}); "
                                    "use the loop kernel")
            return True
        return self.kernel == "auto" and GROUPED_MM and x.is_cuda and x.dtype == torch.bfloat16

    def _token_major_grouped(self, x, experts, gates):
        # The pairs in the loop's order (by expert, then slot, then token), each expert's run one group of three
        # grouped GEMMs. The group ends come from a search over the sorted experts, on the device: bincount
        # would size its output on the host (a synchronisation per layer). An expert with no pair is an empty
        # group and reads no weight.
        num_tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = self.pair_order(experts)
        ends = torch.searchsorted(flat[order], torch.arange(self.gate_proj.shape[0], device=x.device), right=True)
        ends = ends.to(torch.int32)
        token_of = order // k
        rows = x.index_select(0, token_of)
        hidden = F.silu(F.grouped_mm(rows, self.gate_proj.transpose(1, 2), offs=ends)) * F.grouped_mm(
            rows, self.up_proj.transpose(1, 2), offs=ends)
        outputs = F.grouped_mm(hidden, self.down_proj.transpose(1, 2), offs=ends)
        if self.slot_sum_fp32:
            placed = torch.empty_like(outputs).index_copy(0, order, outputs)
            mixed = (placed.view(num_tokens, k, -1).float() * gates.float().unsqueeze(-1)).sum(dim=1)
            return mixed.to(x.dtype)
        gate_of = gates.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, (outputs * gate_of).to(x.dtype))

    def _expert_major(self, x, tokens, gates):
        # EC: every expert has the same number of tokens, so one batched matmul per projection runs them all.
        # Why not the obvious forms: index_select's backward is an index_add, cheaper than x[tokens]'s
        # accumulating index_put; the gate scales the hidden activations [E, C, f] rather than the output
        # [E, C, d] (the same product, down_proj being linear) for half the elementwise traffic.
        chosen = x.index_select(0, tokens.reshape(-1)).view(*tokens.shape, x.shape[-1])  # [E, C, d]
        hidden = F.silu(torch.bmm(chosen, self.gate_proj.transpose(1, 2))) * torch.bmm(
            chosen, self.up_proj.transpose(1, 2))
        hidden = hidden * gates.to(x.dtype).unsqueeze(-1)
        out = torch.bmm(hidden, self.down_proj.transpose(1, 2))
        # Under autocast the matmuls return bf16 while x may be fp32: accumulate in x's dtype.
        return torch.zeros_like(x).index_add_(0, tokens.reshape(-1), out.reshape(-1, x.shape[-1]).to(x.dtype))

    def _token_major_slot_sum(self, x, experts, gates):
        # LLaDA2.0's order: experts in ascending order on their rows, each row's output kept in its (token, slot)
        # place, then out = Σ_slots fp32(output) · fp32(gate), in slot order, cast to the activations' dtype.
        num_tokens, k = experts.shape
        flat = experts.reshape(-1)
        order = self.pair_order(experts)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        rows = x.index_select(0, order // k)
        outputs = []
        for e, h in enumerate(rows.split(counts)):
            if h.shape[0]:
                outputs.append(F.linear(F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e]),
                                        self.down_proj[e]))
        placed = torch.empty(num_tokens * k, x.shape[-1], dtype=outputs[0].dtype, device=x.device)
        placed = placed.index_copy(0, order, torch.cat(outputs))
        mixed = (placed.view(num_tokens, k, -1).float() * gates.float().unsqueeze(-1)).sum(dim=1)
        return mixed.to(x.dtype)

    def _token_major(self, x, experts, gates):
        # TC/block, in the reference block's order of operations so that bf16 results are bit-identical to it:
        # experts in ascending order, each on its (token, slot) pairs ordered by slot and then token (the order
        # torch.where gives the reference's [E, k, T] expert mask), down_proj first and then the gate (cast to
        # the activations' dtype), added in place. One gather split into per-expert views, so the backward
        # builds the gradient of the gathered rows once and no [T·k, d] concatenation is allocated.
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = self.pair_order(experts)
        counts = torch.bincount(flat, minlength=self.gate_proj.shape[0]).tolist()
        token_of = order // k
        gate_of = gates.reshape(-1)[order].to(x.dtype).unsqueeze(-1)
        out = torch.zeros_like(x)
        runs = zip(x.index_select(0, token_of).split(counts), token_of.split(counts), gate_of.split(counts))
        for e, (h, rows, gate) in enumerate(runs):
            if rows.shape[0]:
                h = F.silu(F.linear(h, self.gate_proj[e])) * F.linear(h, self.up_proj[e])
                # .to(x.dtype): under autocast the product is bf16 while x may be fp32
                out.index_add_(0, rows, (F.linear(h, self.down_proj[e]) * gate).to(x.dtype))
        return out


class SparseMoeBlock(nn.Module):
    """Router (``gate``) + stacked experts. Optionally records routing statistics of each forward."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 settings: RouterSettings, scoring: Scoring, slot_sum_fp32: bool = False):
        super().__init__()
        self.gate: Router = build_router(settings, hidden_size, num_experts, top_k, scoring)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size, slot_sum_fp32)
        # Recording is off unless enable_routing_stats() is called (a RoutingStats, or a StatsByMaskRatio).
        self.stats: RoutingStats | None = None
        self.keep_router_logits = False  # set for auxiliary losses (z-loss) that need the gate's logits
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, ctx: RoutingContext) -> torch.Tensor:
        batch, length, dim = x.shape
        routing = self.gate(x, ctx)
        if self.stats is not None:
            self.stats.update(routing, ctx.valid, ctx.focus, ctx.mask_ratio, ctx.block_start)
        if self.keep_router_logits:
            self.router_logits = routing.logits
        return self.experts(x.reshape(-1, dim), routing).view(batch, length, dim)


_EXPERT_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def parse_expert_key(name: str) -> tuple[str, int, str] | None:
    """``model.layers.3.mlp.experts.7.up_proj.weight`` → ``("model.layers.3.mlp.experts", 7, "up_proj")``."""
    m = _EXPERT_KEY.match(name)
    return (m["prefix"], int(m["expert"]), m["proj"]) if m else None


def stack_expert_tensors(tensors: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Hub per-expert names → the model's stacked names; every other tensor passes through unchanged."""
    out, groups = {}, {}
    for name, t in tensors.items():
        parsed = parse_expert_key(name)
        if parsed is None:
            out[name] = t
        else:
            prefix, e, proj = parsed
            groups.setdefault((prefix, proj), {})[e] = t
    for (prefix, proj), by_expert in groups.items():
        missing = sorted(set(range(num_experts)) - set(by_expert))
        if missing:
            raise RetrofitError(f"checkpoint lacks {prefix}.N.{proj}.weight for experts {missing[:8]}")
        out[f"{prefix}.{proj}"] = torch.stack([by_expert[e] for e in range(num_experts)])
    return out


def unstack_expert_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's stacked names → the Hub's per-expert names (views, no copy)."""
    out = {}
    for name, t in tensors.items():
        prefix, _, proj = name.rpartition(".")
        if prefix.endswith(".mlp.experts") and proj in EXPERT_PROJECTIONS:
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = t[e]
        else:
            out[name] = t
    return out


def hub_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the exact names of its Hub checkpoint (experts unstacked, a tied head once)."""
    tensors = unstack_expert_tensors(dict(model.state_dict()))
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    return tensors


def hub_tensor_shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's checkpoint tensors in its Hub checkpoint's order: module order, each
    expert's three projections together (expert 0's gate/up/down, then expert 1's, ...), a tied head once.
    Reads no data, so a model on the meta device plans a full-size checkpoint."""
    out, stacked = [], {}
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        prefix, _, proj = name.rpartition(".")
        if not (prefix.endswith(".experts") and proj in EXPERT_PROJECTIONS):
            if not (tied and name == "lm_head.weight"):
                out.append((name, tuple(tensor.shape)))
            continue
        stacked.setdefault(prefix, {})[proj] = tensor.shape
        if len(stacked[prefix]) == len(EXPERT_PROJECTIONS):
            shapes = stacked.pop(prefix)
            out += [(f"{prefix}.{e}.{p}.weight", tuple(shapes[p][1:]))
                    for e in range(shapes["gate_proj"][0]) for p in EXPERT_PROJECTIONS]
    return out
