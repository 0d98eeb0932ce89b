"""The native LLaDA-MoE against a plain reference, and its loading/saving paths."""

from __future__ import annotations

import pytest
import torch
import transformers

import retrofit  # noqa: F401  (registers the model with transformers' Auto classes)
from retrofit.errors import RetrofitError
from retrofit.io.load import load_model
from retrofit.models.llada_moe import LLADA_MOE, LLaDAMoEModelLM
from retrofit.models.moe import StackedExperts, hub_state_dict, stack_expert_tensors, unstack_expert_tensors
from retrofit.routers import router_settings, swap_routers
from retrofit.routers.base import Routing
from retrofit.tiny import hub_config_dict
from tests.helpers import pairwise_experts, random_ids, runner, tiny_snapshot
from tests.reference_llada import reference_logits


def test_tc_model_matches_plain_reference(tiny_model):
    ids = random_ids(tiny_model, batch=2, length=10)
    with torch.no_grad():
        ours = tiny_model(ids).logits
    ref = reference_logits(hub_state_dict(tiny_model), tiny_model.config, ids)
    assert ours.shape == (2, 10, tiny_model.config.vocab_size)
    torch.testing.assert_close(ours.double(), ref, atol=2e-5, rtol=1e-4)


def test_padding_only_hides_keys(tiny_model):
    ids = random_ids(tiny_model, batch=2, length=9, seed=1)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = tiny_model(ids, attention_mask=mask).logits
        alone = tiny_model(ids[1:, :6]).logits
    ref = reference_logits(hub_state_dict(tiny_model), tiny_model.config, ids, mask)
    torch.testing.assert_close(ours.double()[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    # A padded sequence's real positions see exactly what they would see without the padding (TC routes per
    # token, so padding cannot change them).
    torch.testing.assert_close(ours[1, :6], alone[0], atol=1e-5, rtol=1e-5)


def test_attention_is_bidirectional(tiny_model):
    ids = random_ids(tiny_model, batch=1, length=8)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    with torch.no_grad():
        a, b = tiny_model(ids).logits, tiny_model(changed).logits
    assert not torch.allclose(a[0, 0], b[0, 0]), "the first position must see the last one"


def test_expert_stacking_round_trip_is_exact(tiny_model):
    hub = hub_state_dict(tiny_model)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in hub
    assert "model.layers.0.mlp.gate.weight" in hub
    restacked = stack_expert_tensors(hub, tiny_model.config.num_experts)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(restacked[name], tensor), name
    assert set(unstack_expert_tensors(restacked)) == set(hub)


def test_hub_tensor_names_match_the_real_checkpoint(tiny_model):
    names = set(hub_state_dict(tiny_model))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(tiny_model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        expected |= {p + f"{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        expected |= {p + f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
        expected.add(p + "mlp.gate.weight")
        expected |= {p + f"mlp.experts.{e}.{n}.weight" for e in range(8) for n in ("gate_proj", "up_proj", "down_proj")}
    assert names == expected


def test_snapshot_load_is_exact(tiny_dir, tiny_model):
    loaded = load_model(tiny_dir)
    ids = random_ids(tiny_model)
    # The snapshot is bf16: the loaded model equals the original rounded to bf16 and back, bit for bit.
    rounded = {k: v.to(torch.bfloat16).float() for k, v in tiny_model.state_dict().items()}
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, rounded[name]), name
    assert loaded.config.mask_token_id == 257, "mask id comes from the tokenizer when config.json lacks it"
    with torch.no_grad():
        assert torch.isfinite(loaded(ids).logits).all()


def test_save_pretrained_round_trip_is_bit_exact(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "saved")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(hub_state_dict(tiny_model)), "save_pretrained must write Hub (per-expert) names"
    again = transformers.AutoModel.from_pretrained(tmp_path / "saved")
    assert isinstance(again, LLaDAMoEModelLM)
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ids = random_ids(tiny_model)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, tiny_model(ids).logits)


def test_hub_config_is_recognised_by_architecture_not_model_type():
    raw = hub_config_dict()
    assert raw["model_type"] == "llada"
    assert LLADA_MOE.config_from_checkpoint(raw).num_experts == 8
    dense = {**raw, "architectures": ["LLaDAModelLM"]}
    dense.pop("num_experts")
    with pytest.raises(RetrofitError, match="not a LLaDA-MoE checkpoint"):
        LLADA_MOE.config_from_checkpoint(dense)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"shared_expert_intermediate_size": 64}, "shared_expert_intermediate_size"),
        ({"moe_router_score_function": "sigmoid"}, "sigmoid"),
        ({"moe_layer_freq": [0, 1]}, "moe_layer_freq"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ],
)
def test_unsupported_config_is_refused_by_name(change, message):
    with pytest.raises(RetrofitError, match=message):
        LLADA_MOE.config_from_checkpoint({**hub_config_dict(), **change})


def test_unknown_config_keys_load_with_one_warning_and_are_kept(tiny_dir, tmp_path, caplog):
    """A real config.json may carry export leftovers; they load, are named once, and travel into the output."""
    import json
    import logging

    from retrofit.cli import app

    raw = json.loads((tiny_dir / "config.json").read_text())
    raw.update(megatron_tp_size=1, frobnicate={"a": 1})
    (tiny_dir / "config.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        assert load_model(tiny_dir).config.num_experts == 8
    lines = [r.getMessage() for r in caplog.records if r.name == "retrofit"]
    assert len(lines) == 1 and "frobnicate, megatron_tp_size" in lines[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--out",
                                     str(tmp_path / "ec")])
    assert result.exit_code == 0, result.output
    assert not caplog.records, "said once per process, not once per reading of the config"
    kept = json.loads((tmp_path / "ec" / "config.json").read_text())
    assert kept["megatron_tp_size"] == 1 and kept["frobnicate"] == {"a": 1}


def test_padding_row_gets_no_gradient(tiny_model):
    pad = tiny_model.config.pad_token_id
    assert tiny_model.model.embed_tokens.padding_idx == pad
    ids = torch.tensor([[pad, 5, pad, 7]])
    tiny_model.train()
    tiny_model(ids).logits.sum().backward()
    grad = tiny_model.model.embed_tokens.weight.grad
    assert torch.count_nonzero(grad[pad]) == 0 and torch.count_nonzero(grad[5]) > 0


def test_tiny_snapshot_auto_map_names_the_hub_classes():
    assert hub_config_dict()["auto_map"]["AutoConfig"] == "configuration_lladamoe.LLaDAConfig"


def test_routing_stats_through_the_model(tiny_model):
    from retrofit.routers import router_settings

    ids = random_ids(tiny_model, batch=2, length=8)
    with torch.no_grad():
        tiny_model(ids)  # statistics are off by default
        tiny_model.enable_routing_stats()
        tiny_model(ids)
        tiny_model(ids)
    stats = tiny_model.routing_stats()
    cfg = tiny_model.config
    # TC: every token has exactly k experts, in every layer and forward.
    assert stats.routings == 2 * cfg.num_hidden_layers
    assert stats.experts_per_token.tolist()[cfg.num_experts_per_tok] == stats.num_tokens == 2 * 2 * 16
    assert int(stats.tokens_per_expert.sum()) == stats.num_tokens * cfg.num_experts_per_tok
    assert 1 <= stats.unique_experts <= cfg.num_experts
    swap_routers(tiny_model, router_settings(type="ec", capacity_factor=0.5))
    tiny_model.enable_routing_stats()
    with torch.no_grad():
        tiny_model(ids)
    ec = tiny_model.routing_stats()
    assert ec.unique_experts == cfg.num_experts, "every expert works under expert choice"
    assert ec.as_dict()["capacity_per_routing"] == 2 * round(8 * 2 / 8 * 0.5)
    tiny_model.enable_routing_stats(False)
    with pytest.raises(RuntimeError):
        tiny_model.routing_stats()


def test_swap_routers_keeps_gate_weights_and_tc_is_identity(tiny_model):
    ids = random_ids(tiny_model)
    before = {n: p.clone() for n, p in tiny_model.state_dict().items()}
    with torch.no_grad():
        tc_logits = tiny_model(ids).logits
        swap_routers(tiny_model, router_settings(type="ec"))
        ec_logits = tiny_model(ids).logits
        swap_routers(tiny_model, router_settings(type="tc"))
        again = tiny_model(ids).logits
    assert all(torch.equal(before[n], p) for n, p in tiny_model.state_dict().items())
    assert not torch.equal(tc_logits, ec_logits)
    assert torch.equal(tc_logits, again)


def test_default_config_is_llada_moe_7b_a1b_to_the_parameter():
    """docs/algorithms.md §1: the public checkpoint has exactly 7,356,880,896 parameters, 2.1M of them routers."""
    from retrofit.models.llada_moe import LLaDAMoEConfig
    from retrofit.training.trainable import router_parameter_names

    with torch.device("meta"):
        model = LLaDAMoEModelLM(LLaDAMoEConfig())
    assert sum(p.numel() for p in model.parameters()) == 7_356_880_896
    routers = set(router_parameter_names(model))
    assert sum(p.numel() for n, p in model.named_parameters() if n in routers) == 16 * 64 * 2048
    assert model.config.mask_token_id == 156895 and model.config.eos_token_id == 156892


@pytest.mark.parametrize("layout", ["token", "expert"])
def test_experts_match_pairwise_reference_with_gradients(layout):
    """Both layouts (TC/block sort-and-split, EC batched) give the pairwise sum and its gradients for the input,
    the gates and the expert weights; tokens may be chosen by several experts or by none (EC)."""
    gen = torch.Generator().manual_seed(0)
    tokens, num_experts, k, capacity = 10, 4, 2, 5
    experts = StackedExperts(num_experts, 6, 3).double()
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    x = torch.randn(tokens, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    if layout == "token":
        indices = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)])
    else:
        indices = torch.stack([torch.randperm(tokens, generator=gen)[:capacity] for _ in range(num_experts)])
    gates = torch.rand(indices.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    routing = Routing(layout=layout, indices=indices, gates=gates, num_experts=num_experts)
    inputs = (x, gates, *experts.parameters())
    weights = torch.randn(tokens, 6, generator=gen, dtype=torch.float64)
    got = experts(x, routing)
    expected = pairwise_experts(experts, x, routing)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad((got * weights).sum(), inputs),
                    torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_bf16_logits_are_bit_identical_to_the_reference_order_over_long_sequences(tmp_path):
    """bf16 as users run the 7B model, through the loading path `retrofit eval` uses, 1,100 positions."""
    from safetensors.torch import load_file

    from tests.reference_llada import reference_order_logits

    src = tiny_snapshot(tmp_path / "m", max_shard_bytes=10**9, dtype=torch.bfloat16, seed=4,
                        max_position_embeddings=2048)
    loaded = load_model(src, dtype=torch.bfloat16)
    ids = torch.randint(0, 256, (2, 1100), generator=torch.Generator().manual_seed(0))
    tensors = load_file(str(src / "model.safetensors"))
    with torch.no_grad():
        ours = loaded(ids).logits
        reference = reference_order_logits(tensors, loaded.config, ids)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, reference), f"max diff {(ours.float() - reference.float()).abs().max()}"


def test_a_tiny_config_refuses_keys_that_are_not_config_fields():
    """A generic shape name (layers=, experts=) is no config field: it used to be kept and read by nothing, so the
    model silently took the default shape. It goes through tiny_shape instead."""
    from retrofit.tiny import tiny_shape

    with pytest.raises(TypeError, match="not LLaDA-MoE config fields: experts, layers"):
        hub_config_dict(layers=3, experts=16)
    config = hub_config_dict(**tiny_shape(layers=3, experts=16, top_k=4))
    assert (config["num_hidden_layers"], config["num_experts"], config["num_experts_per_tok"]) == (3, 16, 4)


def test_expert_choice_copies_its_tokens_once():
    """EC's equal groups run as batched matmuls over one gathered [E, C, d] input: the forward allocates exactly
    two tensors of that size (the gathered tokens and the down projection's output), no staging copies."""
    from torch.utils._python_dispatch import TorchDispatchMode

    num_experts, capacity, d, f = 4, 6, 8, 5
    experts = StackedExperts(num_experts, d, f)
    x = torch.randn(10, d)
    tokens = torch.randint(0, 10, (num_experts, capacity))
    routing = Routing("expert", tokens, torch.rand(num_experts, capacity), num_experts)
    views = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default,
             torch.ops.aten.alias.default, torch.ops.aten.t.default, torch.ops.aten.transpose.int,
             torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default}

    class Allocations(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and func not in views and out.numel() == num_experts * capacity * d:
                self.sizes.append(func.__name__)
            return out

    with torch.no_grad(), Allocations() as seen:
        experts(x, routing)
    assert seen.sizes == ["index_select.default", "bmm.default"]
