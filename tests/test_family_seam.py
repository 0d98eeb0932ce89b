"""The two extension seams, each proved by a toy defined only here: a second model family (LLaDA-MoE with one
dense first layer and a shared expert in every MoE layer) and a new router ("random top-k"). Each is one class
plus one registry line, and converts, fine-tunes and evaluates through the unchanged commands."""

from __future__ import annotations

import importlib
import json
from typing import Literal

import pytest
import torch
from pydantic import Field

from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.models import FAMILIES, ModelFamily, register_family
from retrofit.models.layers import SwiGLU
from retrofit.models.llada_moe import LLADA_MOE, LLaDAMoEConfig, LLaDAMoEModel, LLaDAMoEModelLM
from retrofit.models.moe import SparseMoeBlock
from retrofit.routers import ROUTERS, Router, RouterSettings, Routing, RoutingContext, register_router
from retrofit.tiny import build_tiny_model
from tests.helpers import gsm8k_train, random_ids, runner, shared_data_dir, tiny_snapshot

# ------------------------------------------------------------------------------------------ toy family


class SharedExpertMoe(SparseMoeBlock):
    """The routed experts plus one always-on shared expert."""

    def __init__(self, config, settings, scoring):
        super().__init__(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                         config.expert_intermediate_size, settings, scoring)
        self.shared_experts = SwiGLU(config.hidden_size, config.shared_expert_intermediate_size)

    def forward(self, x, ctx):
        return super().forward(x, ctx) + self.shared_experts(x)


class ToyConfig(LLaDAMoEConfig):
    model_type = "toy_moe"

    def __init__(self, first_k_dense_replace: int = 1, dense_intermediate_size: int | None = 96,
                 shared_expert_intermediate_size: int | None = 48, **kwargs):
        self.first_k_dense_replace = first_k_dense_replace
        super().__init__(dense_intermediate_size=dense_intermediate_size,
                         shared_expert_intermediate_size=shared_expert_intermediate_size, **kwargs)

    def _refuse_unsupported(self) -> None:  # this family implements shared experts and dense layers
        pass


class ToyModel(LLaDAMoEModel):
    def build_mlp(self, config, layer):
        if layer < config.first_k_dense_replace:
            return SwiGLU(config.hidden_size, config.dense_intermediate_size)
        return SharedExpertMoe(config, config.router_settings, TOY.scoring(config))


class ToyModelLM(LLaDAMoEModelLM):
    config_class = ToyConfig
    backbone_class = ToyModel


class ToyFamily(ModelFamily):
    name = "toy-moe"
    display_name = "Toy-MoE"
    model_type = "toy_moe"
    architecture = "ToyModelLM"
    config_class = ToyConfig
    model_class = ToyModelLM

    def moe_layers(self, config):
        return list(range(config.first_k_dense_replace, config.num_hidden_layers))

    def tiny_dims(self, **shape):
        return LLADA_MOE.tiny_dims(**shape)

    def hub_config(self, config):
        raw = LLADA_MOE.hub_config(config)
        raw.pop("auto_map")
        return {**raw, "model_type": self.model_type, "architectures": [self.architecture],
                "first_k_dense_replace": config.first_k_dense_replace}


TOY = ToyFamily()

# ------------------------------------------------------------------------------------------ toy router


class RandomTopKSettings(RouterSettings):
    type: Literal["random-topk"] = "random-topk"
    jitter: float = Field(default=1.0, ge=0, description="scale of the fixed random noise added to the scores "
                                                         "before each token's top-k")


class RandomTopKRouter(Router):
    """Each token takes the top-k of its scores plus seeded noise; the gates are its scores there."""

    kind = "random-topk"
    settings_class = RandomTopKSettings

    def select(self, probs, ctx: RoutingContext) -> Routing:
        flat = probs.reshape(-1, self.num_experts)
        noise = torch.rand(flat.shape, generator=torch.Generator().manual_seed(0)).to(flat.device)
        experts = (flat + self.settings.jitter * noise).topk(self.top_k, dim=-1).indices
        return Routing("token", experts, flat.gather(-1, experts), self.num_experts)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def toy_family():
    register_family(TOY)  # the one registry line a new family needs
    yield TOY
    FAMILIES.pop(TOY.name)


@pytest.fixture
def toy_router():
    """Registered, and the command line rebuilt so that its flags are generated from the toy's settings too."""
    import retrofit.cli

    register_router(RandomTopKRouter)  # the one registry line a new router needs
    yield importlib.reload(retrofit.cli).app
    ROUTERS.pop(RandomTopKRouter.kind)
    importlib.reload(retrofit.cli)


def toy_snapshot(tmp_path, seed=0):
    model = build_tiny_model(seed, family=TOY)
    with torch.no_grad():  # weights on the bf16 grid, so the written snapshot holds exactly this model
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model, tiny_snapshot(tmp_path / "toy-src", model, max_shard_bytes=48 * 1024)


def finetune(app, tmp_path, source, out, router: dict | None = None):
    recipe = {
        "model": {"source": str(source), **({"router": router} if router else {})},
        "data": {"path": str(gsm8k_train()), "text_field": ["question", "answer"],
                 "seq_len": 32, "max_examples": 16},
        "objective": {"balance_loss": 0.01, "distill": {"weight": 0.5}},
        "optim": {"max_steps": 2, "batch_size": 2, "lr": 0.05, "warmup_steps": 0},
        "checkpoint": {"output_dir": str(out)},
        "logging": {"every": 1},
    }
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    result = runner.invoke(app, ["finetune", str(path)])
    assert result.exit_code == 0, result.output
    return out


def evaluate(app, model_dir, tmp_path, *flags):
    out = tmp_path / f"eval-{model_dir.name}.json"
    result = runner.invoke(app, ["eval", "--model", str(model_dir), "--tasks", "gsm8k", "--limit", "1", "--data-dir",
                                 str(shared_data_dir()), "--gen-length", "8", "--steps", "4", "--output", str(out),
                                 *flags])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


# ------------------------------------------------------------------------------------------ the family


def test_toy_family_loads_exactly_and_routes_only_its_moe_layers(toy_family, tmp_path):
    model, path = toy_snapshot(tmp_path)
    loaded = load_model(path)
    assert type(loaded) is ToyModelLM and isinstance(loaded.model.layers[0].mlp, SwiGLU)
    assert len(loaded.moe_blocks()) == model.config.num_hidden_layers - 1
    ids = random_ids(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_toy_family_converts_finetunes_and_evaluates(toy_family, tmp_path):
    from retrofit.cli import app

    _, src = toy_snapshot(tmp_path)
    same = tmp_path / "toy-tc"
    result = runner.invoke(app, ["convert", "--src", str(src), "--router", "tc", "--out", str(same)])
    assert result.exit_code == 0 and "bit-identical" in result.output, result.output
    ec = tmp_path / "toy-ec"
    result = runner.invoke(app, ["convert", "--src", str(src), "--router", "ec", "--out", str(ec)])
    assert result.exit_code == 0, result.output
    config = json.loads((ec / "config.json").read_text())
    assert config["model_type"] == "toy_moe" and config["router"]["type"] == "ec"
    assert "model.layers.0.mlp.gate.weight" not in CheckpointDir(ec).weight_map  # the dense layer has no router

    tuned = finetune(app, tmp_path, ec, tmp_path / "toy-ec-ft")
    before, after = CheckpointDir(ec), CheckpointDir(tuned)
    router = TOY.router_tensor_name(1)
    assert not torch.equal(before.read([router])[router], after.read([router])[router]), "the router trained"
    shared = "model.layers.1.mlp.shared_experts.up_proj.weight"
    assert torch.equal(before.read([shared])[shared], after.read([shared])[shared]), "nothing else did"

    record = evaluate(app, tuned, tmp_path)
    assert record["router"]["type"] == "ec" and "exact_match" in json.dumps(record["results"])
    assert record["routing"]["tokens"] > 0


# ------------------------------------------------------------------------------------------ the router


@pytest.mark.slow
def test_toy_router_converts_finetunes_and_evaluates(toy_router, tiny_dir, tmp_path):
    app = toy_router
    help_text = runner.invoke(app, ["convert", "--help"]).output
    assert "--jitter" in help_text and "random-topk: scale of the fixed random noise" in help_text
    out = tmp_path / "tiny-random-topk"
    result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "random-topk", "--jitter", "0.5",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["router"] == {"type": "random-topk", "jitter": 0.5}
    model = load_model(out)
    assert all(isinstance(b.gate, RandomTopKRouter) and b.gate.settings.jitter == 0.5 for b in model.moe_blocks())

    tuned = finetune(app, tmp_path, tiny_dir, tmp_path / "tiny-random-topk-ft",
                     router={"type": "random-topk", "jitter": 0.25})
    assert json.loads((tuned / "config.json").read_text())["router"] == {"type": "random-topk", "jitter": 0.25}

    record = evaluate(app, tiny_dir, tmp_path, "--router", "random-topk", "--jitter", "2")
    assert record["router"] == {"type": "random-topk", "jitter": 2.0}
    line = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--router", "ec",
                               "--jitter", "2"]).output
    assert "--jitter is a setting of the random-topk router, not of ec" in line
