"""The native LLaDA2.0 against a plain reference written from the public modeling code (tests/reference_llada2.py):
float64 parity, bit-exact bf16 in the reference's order of operations, its routing, its size."""

from __future__ import annotations

import pytest
import torch

from retrofit.io.load import load_model
from retrofit.models import LLADA2, LLaDA2Config, LLaDA2ModelLM
from retrofit.models.moe import hub_state_dict, stack_expert_tensors
from retrofit.routers import RoutingContext
from tests.helpers import tiny_snapshot
from tests.reference_llada2 import (
    TINY_LLADA2_CONFIG,
    reference_logits,
    reference_order_logits,
    reference_routing,
    tiny_llada2_tensors,
)


def native(tensors: dict, dtype: torch.dtype) -> LLaDA2ModelLM:
    """The native model holding exactly ``tensors`` (Hub names), in ``dtype``."""
    config = LLADA2.config_from_checkpoint({**TINY_LLADA2_CONFIG, "mask_token_id": 299, "eos_token_id": 298,
                                            "pad_token_id": 298})
    model = LLaDA2ModelLM(config).to(dtype).eval()
    stacked = stack_expert_tensors({k: v.to(dtype) for k, v in tensors.items()}, config.num_experts)
    model.load_state_dict(stacked, strict=True)
    return model


def ids(seed: int = 0, batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(0, 298, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_default_config_is_llada2_mini_to_the_parameter():
    """Published 16B total, ~1.4B active: 16,255,638,528 parameters from the config (embedding and head counted
    in the active figure, as the published one does)."""
    with torch.device("meta"):
        model = LLaDA2ModelLM(LLaDA2Config())
    assert sum(p.numel() for p in model.parameters()) == 16_255_638_528
    c = model.config
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = len(model.moe_blocks()) * (c.num_experts - c.num_experts_per_tok) * expert
    assert sum(p.numel() for p in model.parameters()) - inactive == 1_432_968_192
    assert [i for i, layer in enumerate(model.model.layers) if layer.mlp in model.moe_blocks()] == list(range(1, 20))


@pytest.mark.parametrize("blocks", [None, 4, 5])
def test_float64_matches_the_plain_reference(blocks):
    """The model in float64 against the float64 loop; what remains (~1e-7) is the fp32 the model keeps for the
    RMSNorm statistics and the rotary angles, as the reference code does, whatever the weights' dtype."""
    tensors = tiny_llada2_tensors(seed=1, dtype=torch.float64)
    model = native(tensors, torch.float64)
    x = ids(1)
    with torch.no_grad():
        ours = model(x, attention_blocks=blocks).logits
    torch.testing.assert_close(ours, reference_logits(tensors, TINY_LLADA2_CONFIG, x, attention_blocks=blocks),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("blocks", [None, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_is_bit_exact_with_the_reference_order(seed, blocks):
    tensors = tiny_llada2_tensors(seed=seed)
    model = native(tensors, torch.bfloat16)
    x = ids(seed)
    with torch.no_grad():
        ours = model(x, attention_blocks=blocks).logits.float()
    assert torch.equal(ours, reference_order_logits(tensors, TINY_LLADA2_CONFIG, x, attention_blocks=blocks))


def test_token_choice_is_the_reference_routing():
    """Group-limited selection by the biased sigmoid scores, gates from the unbiased ones, renormalised, × 2.5."""
    tensors = tiny_llada2_tensors(seed=3, dtype=torch.float64)
    model = native(tensors, torch.float64)
    hidden = torch.randn(1, 40, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for layer, block in zip(LLADA2.moe_layers(model.config), model.moe_blocks()):
        routing = block.gate(hidden, RoutingContext.unpadded(1, 40))
        experts, weights = reference_routing(tensors, TINY_LLADA2_CONFIG, layer, hidden[0])
        assert torch.equal(routing.indices, experts)
        torch.testing.assert_close(routing.gates.double(), weights, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(routing.gates.sum(-1), torch.full((40,), 2.5, dtype=torch.float64))


def test_block_causal_attention_hides_later_blocks():
    model = native(tiny_llada2_tensors(seed=4, dtype=torch.float64), torch.float64)
    x = ids(4, batch=1, length=12)
    changed = x.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 298
    with torch.no_grad():
        a, b = model(x, attention_blocks=4).logits, model(changed, attention_blocks=4).logits
        full = model(changed).logits
    assert torch.equal(a[:, :8], b[:, :8]), "blocks 0-1 never see block 2"
    assert not torch.equal(full[:, :8], b[:, :8]), "bidirectional attention does"


def test_snapshot_round_trip_and_expert_bias(tmp_path):
    """A Hub-layout tiny LLaDA2.0 (create-tiny --family llada2) loads bit-exactly, its expert bias included."""
    from retrofit.tiny import build_tiny_model

    built = build_tiny_model(seed=5, family=LLADA2)
    with torch.no_grad():
        for p in built.state_dict().values():
            p.copy_(p.to(torch.bfloat16).float())
    path = tiny_snapshot(tmp_path / "l2", built)
    loaded = load_model(path)
    assert type(loaded) is LLaDA2ModelLM
    for name, tensor in hub_state_dict(built).items():
        assert torch.equal(hub_state_dict(loaded)[name], tensor), name
    assert any(bool(b.gate.expert_bias.abs().sum()) for b in loaded.moe_blocks())
    x = ids(5, length=10)
    with torch.no_grad():
        assert torch.equal(loaded(x, attention_blocks=4).logits, built(x, attention_blocks=4).logits)


@pytest.mark.slow
def test_offline_path_on_a_tiny_llada2(tmp_path, shared_data):
    """create-tiny --family llada2 → convert --router block → router fine-tuning → eval gsm8k with the LLaDA2.0
    sampler, all offline, through the same commands as LLaDA-MoE."""
    import json

    from retrofit.cli import app
    from tests.helpers import runner, write_recipe

    src = tmp_path / "l2"
    assert runner.invoke(app, ["create-tiny", str(src), "--family", "llada2"]).exit_code == 0
    block = tmp_path / "l2-block"
    result = runner.invoke(app, ["convert", "--src", str(src), "--router", "block", "--guard-size", "4", "--out",
                                 str(block)])
    assert result.exit_code == 0 and "shards: 3 hard-linked" in result.output, result.output
    recipe = write_recipe(tmp_path, block, model={"router": {"type": "block", "guard_size": 4}},
                          optim={"max_steps": 2, "batch_size": 2}, checkpoint={"output_dir": str(tmp_path / "ft")})
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    prefix = LLADA2.router_tensor_name(1)
    from retrofit.io.checkpoint import CheckpointDir

    before, after = CheckpointDir(block).read([prefix]), CheckpointDir(tmp_path / "ft").read([prefix])
    assert not torch.equal(before[prefix], after[prefix]), "the router trained"
    bias = prefix.removesuffix("weight") + "expert_bias"
    assert torch.equal(CheckpointDir(block).read([bias])[bias], CheckpointDir(tmp_path / "ft").read([bias])[bias])
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "ft"), "--tasks", "gsm8k", "--limit", "1",
                                 "--data-dir", str(shared_data), "--gen-length", "32", "--denoise-block", "32",
                                 "--sampling", "greedy", "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["settings"]["sampler"]["name"] == "llada2" and record["router"]["type"] == "block"
    assert record["routing"]["unique_experts_per_block"] <= 8
    line = runner.invoke(app, ["eval", "--model", str(block), "--tasks", "gsm8k", "--remasking", "random"]).output
    assert "the LLaDA2.0 sampler remasks by confidence only" in line


def test_expert_choice_gates_keep_the_token_choice_scale():
    """EC on LLaDA2.0: a chosen pair's gate is what the token's own token choice gives that expert (score over
    the sum of its top-k scores, × 2.5), so a token's gate mass is about TC's 2.5, not the raw sigmoids'."""
    from retrofit.routers import router_settings, swap_routers
    from retrofit.tiny import build_tiny_model

    model = build_tiny_model(seed=6, family=LLADA2)
    hidden = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(6))
    ctx = RoutingContext.unpadded(1, 64)
    tc = model.moe_blocks()[0].gate(hidden, ctx)
    swap_routers(model, router_settings(type="ec"))
    ec = model.moe_blocks()[0].gate(hidden, ctx)
    scores = torch.sigmoid(tc.logits.float())
    own = tc.gates / scores.gather(-1, tc.indices)  # TC's per-token factor
    tokens, experts, gates = ec.pairs()
    torch.testing.assert_close(gates, scores[tokens, experts] * own[tokens, 0])
    mass = torch.zeros(64).index_add_(0, tokens, gates.detach())
    assert 2.0 < float(mass.mean()) < 3.2


def test_dmoe_16b_evaluates_with_the_block_router_it_was_trained_with(tmp_path, monkeypatch):
    """`retrofit eval --model dmoe-16b`: dMoE's block router (32-token blocks, top-p 0.6, guard 12), read from
    dMoE's config fields when the checkpoint has them, from the registry name when it has none."""
    import json

    import retrofit.sources
    from retrofit.eval.adapter import RetrofitLM
    from retrofit.models.llada2 import DMOE_ROUTER
    from retrofit.routers import router_settings
    from retrofit.tiny import build_tiny_model

    path = tiny_snapshot(tmp_path / "dmoe", build_tiny_model(seed=7, family=LLADA2))
    monkeypatch.setattr(retrofit.sources, "hub_snapshot", lambda repo_id, flag: path)
    lm = RetrofitLM("dmoe-16b", gen_length=32, progress=False)
    assert lm.router == router_settings(DMOE_ROUTER)
    assert all(b.gate.kind == "block" and b.gate.guard_size == 12 for b in lm.model.moe_blocks())
    assert RetrofitLM(str(path), gen_length=32, progress=False).router.type == "tc", "by name only"
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "core_threshold": 0.5, "mode": "aggregate"}))
    assert load_model(path).config.router_settings == router_settings(DMOE_ROUTER, core_threshold=0.5)


def test_llada2_mini_preset_plans_the_real_shapes_and_a_shrunk_one_loads(tmp_path):
    """`create-tiny --preset llada2-mini`: every tensor of the real checkpoint (16,255,638,528 parameters plus 19
    expert biases) in seven 5 GB shards; the same writer at a tiny size gives a snapshot that loads and runs."""
    import math

    from retrofit.tiny import create_preset, full_size_plan

    plan = full_size_plan("llada2-mini")
    assert sum(math.prod(t.shape) for t in plan) == 16_255_638_528 + 19 * 256
    assert len({t.shard for t in plan}) == 7
    assert {"model.layers.1.mlp.gate.expert_bias", "model.layers.19.mlp.shared_experts.down_proj.weight",
            "model.layers.0.mlp.gate_proj.weight"} <= {t.name for t in plan}
    path = create_preset(tmp_path / "p", "llada2-mini", dims=LLADA2.tiny_dims(), eos_token_id=300, mask_token_id=303,
                         max_shard_bytes=64 * 1024)
    model = load_model(path)
    assert type(model) is LLaDA2ModelLM and model.config.mask_token_id == 303
    with torch.no_grad():
        assert torch.isfinite(model(ids(8, length=8) % 256, attention_blocks=4).logits).all()


def test_block_diffusion_training_layout_sees_what_llada2_is_trained_to_see():
    """Noisy and clean copies side by side (dFactory/dMoE's SFT): a noisy token sees its own noisy block and the
    clean earlier blocks, nothing else; clean tokens never see noisy ones."""
    from retrofit.diffusion import block_diffusion_layout

    model = native(tiny_llada2_tensors(seed=9, dtype=torch.float64), torch.float64)
    clean = ids(9, batch=1, length=12)
    noisy = clean.clone()
    noisy[:, ::3] = 299

    def noisy_logits(noisy_ids, clean_ids):
        both, positions, allowed = block_diffusion_layout(noisy_ids, clean_ids, 4)
        with torch.no_grad():
            return model(both, position_ids=positions, allowed_pairs=allowed, logits_to_keep=slice(None, 12)).logits

    base = noisy_logits(noisy, clean)
    later_noisy, later_clean, earlier_clean = noisy.clone(), clean.clone(), clean.clone()
    later_noisy[:, 8:] = 5
    later_clean[:, 4:] = 5
    earlier_clean[:, :4] = 5
    assert torch.equal(noisy_logits(later_noisy, clean)[:, :8], base[:, :8]), "other noisy blocks are hidden"
    assert torch.equal(noisy_logits(noisy, later_clean)[:, :4], base[:, :4]), "clean block 1+ is hidden from block 0"
    changed = noisy_logits(noisy, earlier_clean)
    assert torch.equal(changed[:, :4], base[:, :4]) and not torch.equal(changed[:, 4:], base[:, 4:]), \
        "block 1+ reads the clean block 0"
    _, positions, _ = block_diffusion_layout(noisy, clean, 4)
    assert positions.tolist() == list(range(12)) * 2
