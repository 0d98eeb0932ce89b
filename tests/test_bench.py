"""The benchmark's tables at tiny sizes: structure, finite figures, and the MoE implementations it times agree.
Timings are only reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import math
from functools import partial

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from retrofit.models.llada2 import LLADA2, LLaDA2Config, SharedExpertMoe
from retrofit.routers import RoutingContext, router_settings
from retrofit.tiny import TINY_EOS_ID, TINY_MASK_ID
from retrofit.tools import bench, bench_report
from tests.helpers import pairwise_experts

TOKENS = 16
BLOCK = router_settings(type="block", block_length=TOKENS, core_threshold=0.6, guard_size=4)
# LLaDA2.0-mini's structure in small (16 experts in 4 groups, 2 kept, top-4, a shared expert).
LLADA2_TINY = LLaDA2Config(**LLADA2.tiny_dims(), eos_token_id=TINY_EOS_ID, pad_token_id=TINY_EOS_ID,
                           mask_token_id=TINY_MASK_ID)
DIMS = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, num_experts=4,
            num_experts_per_tok=2, expert_intermediate_size=16)

# Only structure is checked: one thread keeps the tests fast even while other work holds a core.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_implementations_agree():
    layer = bench.MoeLayer(d=64, f=32, experts=8, top_k=2)
    x = layer.tokens(TOKENS)
    impls = bench.implementations(layer)
    outs = {name: bench.forward(impl.run, x) for name, impl in impls.items()}
    torch.testing.assert_close(outs[bench.LOOP], outs[bench.GROUPED], atol=1e-5, rtol=0)
    assert torch.equal(outs[bench.GROUPED_MM], outs[bench.GROUPED])  # the GPU's kernel, run on this CPU
    for name in (bench.BATCHED, bench.BATCHED_BY_LOGIT):
        expected = pairwise_experts(layer.experts, x, impls[name].routing(x))
        torch.testing.assert_close(outs[name], expected, atol=1e-5, rtol=0)


def test_llada2_layer_is_the_familys_moe_block():
    """The bench's LLaDA2.0 layer computes what the model's SharedExpertMoe does under its own token choice (the
    same weights copied in), and every swapped router's output is its pairs' gated expert outputs plus the
    shared expert."""
    layer = bench.MoeLayer.llada2(LLADA2_TINY)
    block = SharedExpertMoe(LLADA2_TINY, router_settings(type="tc"), LLADA2.scoring(LLADA2_TINY))
    with torch.no_grad():
        block.gate.weight.copy_(layer.gate)
        block.gate.expert_bias.copy_(layer.expert_bias)
        block.experts.load_state_dict(layer.experts.state_dict())
        block.shared_experts.load_state_dict(layer.shared.state_dict())
    x = layer.tokens(TOKENS)
    impls = bench.swapped_routers(layer, BLOCK)
    with torch.no_grad():
        own = block(x.unsqueeze(0), RoutingContext.unpadded(1, TOKENS))[0]
        shared = layer.shared(x)
    torch.testing.assert_close(bench.forward(impls[bench.GROUPED].run, x), own, atol=0, rtol=0)
    for impl in impls.values():
        expected = pairwise_experts(layer.experts, x, impl.routing(x)) + shared
        torch.testing.assert_close(bench.forward(impl.run, x), expected, atol=1e-5, rtol=0)


def test_tables_and_report(tmp_path):
    layer = bench.MoeLayer(d=64, f=32, experts=8, top_k=2)
    env = bench.environment(repeats=1)
    seconds = env["seconds"] = {}
    results = {
        "environment": env,
        "moe_layer": bench.moe_layer_table(layer, (TOKENS,), repeats=1),
        "block": bench.block_table(layer, BLOCK, repeats=1),
        "llada2": bench.timed(seconds, "llada2", partial(bench.llada2_tables, (TOKENS,), repeats=1,
                                                         config=LLADA2_TINY, block=BLOCK)),
        "model": bench.model_table(DIMS, repeats=1, batch=2, length=16, probe=bench.peak_memory),
        "memory": bench.memory_table(DIMS, batch=2, length=16, probe=bench.peak_memory),
    }
    seconds["total"] = 2 * seconds["llada2"]
    rows = results["moe_layer"]["rows"]
    assert [r["implementation"] for r in rows] == [bench.LOOP, bench.GROUPED, bench.GROUPED_MM, bench.BATCHED,
                                                   bench.BATCHED_BY_LOGIT, bench.CEILING]
    assert all(r["pairs"] == TOKENS * 2 for r in rows)  # EC at capacity factor 1.0: the same FLOPs as TC
    llada2_rows = results["llada2"]["layer"]["rows"]
    assert [r["implementation"] for r in llada2_rows] == [bench.GROUPED, bench.BATCHED, bench.BLOCKED]
    assert all(r["pairs"] == TOKENS * LLADA2_TINY.num_experts_per_tok for r in llada2_rows)
    assert all(r["fwd"]["speedup"] == 1.0 for r in llada2_rows if r["implementation"] == bench.GROUPED)
    assert results["llada2"]["layer"]["shape"]["shared"] == LLADA2_TINY.moe_intermediate_size
    figures = [v for r in rows + llada2_rows for p in ("fwd", "fwd+bwd") for v in r[p].values()]
    for table in (results["block"], results["llada2"]["block"]):
        figures += [r[key] for r in table["rows"] for key in ("ms", "unique_ratio", "speedup")]
        assert [r["router"] for r in table["rows"]] == [bench.GROUPED, bench.BATCHED, bench.BLOCKED]
    assert all(math.isfinite(v) and v > 0 for v in figures)

    model = results["model"]
    assert set(model["steps"]) == {"inference", "routers", "routers+checkpointing", "all"}
    for step in model["steps"].values():
        assert step["tokens_per_s"] > 0 and step["memory"]["peak_mib"] >= step["memory"]["baseline_mib"] > 0
    assert model["loglikelihood_requests_per_s"] > 0 and model["generation_tokens_per_s"] > 0

    results["targets"] = bench.targets(results, tokens=TOKENS)
    assert len(results["targets"]) == 7 and all(isinstance(t["met"], bool) for t in results["targets"])
    text = bench_report.write_report(results, tmp_path / "results", bench.CEILING)
    assert (tmp_path / "results" / "bench.md").read_text() == text
    assert json.loads((tmp_path / "results" / "bench.json").read_text()) == results
    assert results["memory"]["ratio"] > 0
    for heading in ("## 1. MoE layer", "## 2. One denoising block", "## 3. Tiny model", "## 4. Peak memory",
                    "## 5. LLaDA2.0-mini MoE layer", "## Targets"):
        assert heading in text
    assert "This section took" in text and "table 5 " in text


class BatchedMatmulFlops(TorchDispatchMode):
    """Counts the FLOPs of every batched matmul run under it (forward and autograd's backward alike)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default):
            a = args[-2]
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * out.shape[2]
        return out


def test_ec_gemms_alone_are_the_matmuls_of_the_ec_path():
    """The ceiling row times exactly the batched-matmul work of the EC row's forward and forward+backward."""
    layer = bench.MoeLayer(d=64, f=32, experts=8, top_k=2)
    x, ec, gemms = layer.tokens(TOKENS), bench.implementations(layer)[bench.BATCHED], bench.EcGemms(layer, TOKENS)
    for path, alone in ((lambda: bench.forward(ec.run, x), gemms.forward),
                        (lambda: bench.forward_backward(ec.run, x, layer.gate), gemms.forward_backward)):
        with BatchedMatmulFlops() as full:
            path()
        with BatchedMatmulFlops() as only:
            alone()
        assert full.flops == only.flops > 0


class PretendGpu(bench.Placement):
    """The GPU's code paths (its extra rows, its targets, bf16) on this CPU: nothing here needs CUDA itself."""

    @property
    def cuda(self) -> bool:
        return True

    def sync(self) -> None:
        pass

    def describe(self) -> str:
        return "pretend GPU, bf16"


def test_each_layer_row_has_the_weight_read_limit():
    layer = bench.MoeLayer(d=64, f=32, experts=8, top_k=2)
    table = bench.moe_layer_table(layer, (TOKENS,), repeats=1)
    assert table["copy_gb_per_s"] > 0
    rows = {r["implementation"]: r for r in table["rows"]}
    assert rows[bench.BATCHED]["unique_experts"] == rows[bench.CEILING]["unique_experts"] == 8  # EC: every expert
    assert 0 < rows[bench.GROUPED]["unique_experts"] <= 8
    # the limit is the touched experts' weights (fp32 here) over the measured bandwidth
    per_expert = {r["limit_ms"] / r["unique_experts"] for r in table["rows"]}
    assert max(per_expert) == pytest.approx(min(per_expert))
    assert min(per_expert) == pytest.approx(3 * 64 * 32 * 4 / (table["copy_gb_per_s"] * 1e9) * 1e3)


def test_the_gpu_tables_targets_and_report_run_in_bf16(tmp_path):
    where = PretendGpu(torch.device("cpu"), torch.bfloat16)
    layer = bench.MoeLayer(d=64, f=32, experts=8, top_k=2, where=where)
    assert layer.gate.dtype == layer.experts.gate_proj.dtype == layer.tokens(2).dtype == torch.bfloat16
    env = bench.environment(repeats=1, where=where)
    results = {"environment": env, "moe_layer": bench.moe_layer_table(layer, (TOKENS,), repeats=1),
               "block": bench.block_table(layer, BLOCK, repeats=1),
               "llada2": bench.llada2_tables((TOKENS,), repeats=1, config=LLADA2_TINY, block=BLOCK, where=where)}
    assert [r["implementation"] for r in results["moe_layer"]["rows"]][-2:] == [bench.BLOCKED, bench.CEILING]
    results["targets"] = bench.targets(results, tokens=TOKENS)
    assert [t["target"] for t in results["targets"]][:4] == [
        f"TC fwd at {TOKENS} tokens", f"TC fwd+bwd at {TOKENS} tokens", f"EC fwd at {TOKENS} tokens",
        f"block fwd / TC fwd at {TOKENS} tokens"]
    assert len(results["targets"]) == 8  # no 8,192-token rows here: the dense-rate goals wait for them
    text = bench_report.write_report(results, tmp_path, bench.CEILING)
    assert "Tables 1, 2 and 5 ran on pretend GPU, bf16" in text and "limit ms" in text
    assert "## 3." not in text and "## 4." not in text  # --layers-only: the CPU tables left out


def test_a_gpu_asked_for_without_cuda_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.placement("auto") == bench.CPU
    with pytest.raises(SystemExit, match="--device cuda: this torch sees no CUDA device"):
        bench.placement("cuda")
