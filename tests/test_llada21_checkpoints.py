"""LLaDA2.1 checkpoints: their published config.json is a LLaDA2.0 one (same family, same shapes), their registry
names generate with the token-editing sampler, and a tiny LLaDA2.1-style snapshot converts, fine-tunes and
evaluates with that sampler in both modes."""

from __future__ import annotations

import json

import pytest

import retrofit.sources
from retrofit.cli import app
from retrofit.eval.adapter import RetrofitLM
from retrofit.models import FAMILIES
from retrofit.models.family import family_for_checkpoint
from tests.helpers import finetune, one_line_error, runner, shared_data_dir, tiny_snapshot, write_recipe

LLADA2 = FAMILIES["llada2"]

# inclusionAI/LLaDA2.1-mini's config.json as the Hub shows it (huggingface.co/inclusionAI/LLaDA2.1-mini/blob/main/
# config.json); "auto_map" points at remote code retrofit never runs.
LLADA21_MINI_CONFIG = {
    "architectures": ["LLaDA2MoeModelLM"], "attention_dropout": 0.0, "dtype": "bfloat16", "embedding_dropout": 0.0,
    "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5120, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "llada2_moe",
    "moe_intermediate_size": 512, "moe_router_enable_expert_bias": True, "n_group": 8, "norm_head": False,
    "norm_softmax": False, "norm_topk_prob": True, "num_attention_heads": 16, "num_experts": 256,
    "num_experts_per_tok": 8, "num_hidden_layers": 20, "num_key_value_heads": 4, "num_shared_experts": 1,
    "output_dropout": 0.0, "output_router_logits": False, "pad_token_id": 156892, "partial_rotary_factor": 0.5,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 600000, "rotary_dim": 64, "routed_scaling_factor": 2.5,
    "router_dtype": "fp32", "score_function": "sigmoid", "sliding_window": 4096, "tie_word_embeddings": False,
    "topk_group": 4, "transformers_version": "4.57.1", "use_bias": False, "use_cache": False, "use_qk_norm": True,
    "use_qkv_bias": False, "use_sliding_window": False, "vocab_size": 157184,
}


def test_llada21_mini_config_is_a_llada2_config(caplog):
    assert family_for_checkpoint(LLADA21_MINI_CONFIG) is LLADA2
    config = LLADA2.config_from_checkpoint(LLADA21_MINI_CONFIG)
    mini = LLADA2.config_class()  # LLaDA2.0-mini's shapes
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "moe_intermediate_size", "num_experts", "num_experts_per_tok",
                  "num_shared_experts", "n_group", "topk_group", "first_k_dense_replace", "vocab_size",
                  "routed_scaling_factor", "partial_rotary_factor", "rope_theta"):
        assert getattr(config, field) == getattr(mini, field), field
    assert not [r for r in caplog.records if "does not use" in r.getMessage()]


def test_registry_names_generate_with_the_editing_sampler(tmp_path, monkeypatch):
    assert LLADA2.hub_models["llada2.1-mini"] == "inclusionAI/LLaDA2.1-mini"
    assert LLADA2.hub_models["llada2.1-flash"] == "inclusionAI/LLaDA2.1-flash"
    path = tiny_snapshot(tmp_path / "mini", family=LLADA2)
    monkeypatch.setattr(retrofit.sources, "hub_snapshot", lambda repo_id, flag: path)
    assert RetrofitLM("llada2.1-mini", gen_length=16, progress=False).sampler.kind == "llada2.1"
    assert RetrofitLM("llada2-mini", gen_length=16, progress=False).sampler.kind == "llada2"
    assert RetrofitLM(str(path), gen_length=16, progress=False).sampler.kind == "llada2", "by name only"
    assert RetrofitLM(str(path), gen_length=16, progress=False, sampler="llada2.1").sampler.kind == "llada2.1"
    # A converted LLaDA2.1 checkpoint remembers its sampler.
    out = tmp_path / "ec"
    assert runner.invoke(app, ["convert", "--src", "llada2.1-mini", "--router", "ec", "--out", str(out)]).exit_code == 0
    assert json.loads((out / "config.json").read_text())["sampler"] == "llada2.1"
    assert RetrofitLM(str(out), gen_length=16, progress=False).sampler.kind == "llada2.1"


def _eval(model, output, *extra):
    return runner.invoke(app, ["eval", "--model", str(model), "--tasks", "gsm8k", "--limit", "2", "--num-fewshot",
                               "0", "--data-dir", str(shared_data_dir()), "--gen-length", "16", "--denoise-block",
                               "8", "--no-figures", "--output", str(output), *extra])


@pytest.mark.slow
def test_tiny_llada21_converts_finetunes_and_evaluates_in_both_modes(tmp_path):
    tiny = tmp_path / "tiny"
    assert runner.invoke(app, ["create-tiny", str(tiny), "--family", "llada2"]).exit_code == 0
    converted = tmp_path / "ec"
    result = runner.invoke(app, ["convert", "--src", str(tiny), "--router", "ec", "--sampler", "llada2.1", "--out",
                                 str(converted)])
    assert result.exit_code == 0, result.output
    _, trained = finetune(write_recipe(tmp_path, converted, optim={"max_steps": 2}, checkpoint={"every": 2}))
    tuned = trained.output_dir
    assert json.loads((tuned / "config.json").read_text())["sampler"] == "llada2.1"  # carried through finetune
    records = {}
    for mode in ("speed", "quality"):
        output = tmp_path / f"{mode}.json"
        result = _eval(tuned, output, "--sampler-mode", mode, "--apply-chat-template")
        assert result.exit_code == 0, result.output
        records[mode] = json.loads(output.read_text())
        sampler = records[mode]["settings"]["sampler"]
        assert sampler["name"] == "llada2.1"
        assert (sampler["threshold"], sampler["editing_threshold"]) == {"speed": (0.5, 0.0), "quality": (0.7, 0.5)}[mode]
        assert records[mode]["router"]["type"] == "ec"
        assert "exact_match[flexible-extract]" in records[mode]["results"]["gsm8k"]
    line = one_line_error(_eval(tiny, tmp_path / "x.json", "--sampler-mode", "speed"))
    assert "LLaDA2.1 sampler" in line and "add --sampler llada2.1" in line
    line = one_line_error(_eval(tuned, tmp_path / "x.json", "--steps", "8"))
    assert "--steps 8 has no effect on the LLaDA2.1 sampler" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", "tiny", "--tasks", "gsm8k", "--sampler", "llada2.1"]))
    assert "LLaDA-MoE checkpoints generate with llada" in line
