"""Router fine-tuning on tiny models with the local GSM8K data: what changes, resume, losses, bad recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from retrofit.cli import app
from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.tiny import build_tiny_model
from retrofit.diffusion import add_noise, diffusion_loss
from retrofit.training.recipe import load_recipe
from retrofit.training.trainer import Finetune
from tests.helpers import REPO, finetune, gsm8k_train, one_line_error, runner, tiny_snapshot, write_recipe


@pytest.fixture(scope="module")
def strong_tiny(tmp_path_factory) -> Path:
    """A tiny model whose experts are large enough that routing visibly matters to the loss."""
    model = build_tiny_model(seed=0)
    with torch.no_grad():
        for block in model.moe_blocks():
            for p in (block.experts.gate_proj, block.experts.up_proj, block.experts.down_proj):
                p.mul_(25.0)
    return tiny_snapshot(tmp_path_factory.mktemp("m") / "tiny", model, max_shard_bytes=64 * 1024)


def small_stand_in(tmp_path):
    """A random model of small's routing geometry, as `make small` writes first."""
    return tiny_snapshot(tmp_path / "small-init", hidden_size=32, num_experts=64, num_experts_per_tok=8,
                         expert_intermediate_size=8)


def test_every_shipped_recipe_validates(tmp_path):
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    shipped = {"ec.yaml", "ec-timestep.yaml", "block.yaml", "tiny-ec.yaml", "llada2-block.yaml"}
    assert {p.name for p in recipes} >= shipped
    small_init = small_stand_in(tmp_path)
    for path in recipes:
        # tiny-pretrain starts from the random model `make tiny` writes first; tiny has its shapes (and vocabulary);
        # small-pretrain from `make small`'s, here a stand-in of its routing geometry
        made_first = {"tiny-pretrain.yaml": ["model.source=tiny"],
                      "small-pretrain.yaml": [f"model.source={small_init}"]}.get(path.name, [])
        # Another output directory: one that `make demo` already filled would be refused, rightly, without --resume.
        elsewhere = f"checkpoint.output_dir={tmp_path / path.stem}"
        result = runner.invoke(app, ["validate", str(path), *made_first, elsewhere])
        assert result.exit_code == 0, (path, result.output)
    line = one_line_error(runner.invoke(app, ["validate", str(REPO / "recipes" / "tiny-pretrain.yaml"),
                                              "model.source=./no-such-dir"]))
    assert "model.source not found: ./no-such-dir" in line


def test_routers_only_run_changes_only_router_tensors(strong_tiny, tmp_path):
    _, result = finetune(write_recipe(tmp_path, strong_tiny))
    assert (result.output_dir / "curves.png").read_bytes()[:4] == b"\x89PNG", "curves beside metrics.jsonl"
    src, out = CheckpointDir(strong_tiny), CheckpointDir(result.output_dir)
    assert set(src.weight_map) == set(out.weight_map)
    changed = set()
    for name in src.weight_map:
        a, b = src.read([name])[name], out.read([name])[name]
        if a.shape != b.shape or not torch.equal(a.float(), b.float()):
            changed.add(name)
    assert changed == {f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    config = json.loads((result.output_dir / "config.json").read_text())
    assert config["router"]["type"] == "ec" and config["model_type"] == "llada_moe"
    assert (result.output_dir / "router.safetensors").is_file()
    assert not (result.output_dir / "adapter").exists()
    lines = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert {"diffusion", "lr", "tokens_per_s", "routing"} <= set(lines[-1])
    assert {"unique_experts", "tokens_per_expert", "tokens_with_zero_experts"} <= set(lines[-1]["routing"])
    # The result loads like any converted model, with the trained routers.
    model = load_model(result.output_dir)
    assert model.config.router_settings.type == "ec"


def held_out_loss(model, data, mask_id, draws: int = 16) -> float:
    gen = torch.Generator().manual_seed(1234)
    ids, prompt_len = data.input_ids[:32], data.prompt_len[:32]
    total = 0.0
    for _ in range(draws):
        noise = add_noise(ids, prompt_len, mask_id, 1e-3, gen)
        with torch.no_grad():
            logits = model(input_ids=noise.noisy, mask_ratio=noise.t).logits
        total += float(diffusion_loss(logits, ids, noise))
    return total / draws


def test_loss_decreases_with_router_training(strong_tiny, tmp_path):
    # The model is random, so routing moves the loss only by hundredths; the comparison is paired (the same
    # 16 noise draws before and after) so that such a change is well above the estimate's own noise. The EC
    # trajectory depends on the last bits of matmuls (top-C picks flip), so the margin is half the smallest
    # gain seen across learning rates and thread counts (0.010 to 0.020).
    recipe, recipe_dir = load_recipe(write_recipe(tmp_path, strong_tiny), ["optim.max_steps=40", "optim.lr=0.02"])
    job = Finetune(recipe, recipe_dir)
    before = held_out_loss(job.model, job.data, job.config.mask_token_id)
    job.run()
    after = held_out_loss(job.model, job.data, job.config.mask_token_id)
    assert after < before - 0.005, (before, after)


def test_resume_ends_with_identical_weights(strong_tiny, tmp_path, one_thread):
    straight = tmp_path / "a"
    straight.mkdir()
    _, full = finetune(write_recipe(straight, strong_tiny))

    interrupted = tmp_path / "b"
    interrupted.mkdir()
    path = write_recipe(interrupted, strong_tiny)

    def stop_after_8(done, total, values):
        if done == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(path, progress=stop_after_8)
    assert sorted(p.name for p in (interrupted / "run" / "checkpoints").iterdir()) == ["step-000004", "step-000008"]
    _, resumed = finetune(path, resume=True)
    assert resumed.steps == 4
    a, b = CheckpointDir(full.output_dir), CheckpointDir(resumed.output_dir)
    for name in a.weight_map:
        assert torch.equal(a.read([name])[name], b.read([name])[name]), name
    steps = [json.loads(line)["step"] for line in (interrupted / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12], "resumed metrics continue without duplicates"


def test_heldout_log_does_not_perturb_training_and_resumes(strong_tiny, tmp_path, one_thread):
    heldout = {"data": {"path": str(gsm8k_train()), "text_field": "answer", "seq_len": 64, "max_examples": 16},
               "every": 4, "mask_ratios": [0.2, 0.8]}
    plain, probed, interrupted = (tmp_path / n for n in ("plain", "probed", "interrupted"))
    for folder in (plain, probed, interrupted):
        folder.mkdir()
    _, without = finetune(write_recipe(plain, strong_tiny))
    _, straight = finetune(write_recipe(probed, strong_tiny, heldout=heldout))
    a, b = CheckpointDir(without.output_dir), CheckpointDir(straight.output_dir)
    for name in a.weight_map:
        assert torch.equal(a.read([name])[name], b.read([name])[name]), "held-out evaluation changed training"
    records = [json.loads(line) for line in (probed / "run" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 4, 8, 12]
    assert [r["tokens"] for r in records] == [0, 4 * 4 * 64, 8 * 4 * 64, 12 * 4 * 64]
    assert all(set(r["by_ratio"]) == {"0.2", "0.8"} and math.isfinite(r["loss"]) for r in records)
    assert 0 == records[0]["train_s"] < records[1]["train_s"] < records[-1]["train_s"]

    path = write_recipe(interrupted, strong_tiny, heldout=heldout)

    def stop_after_8(done, total, values):
        if done == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(path, progress=stop_after_8)
    finetune(path, resume=True)
    resumed = [json.loads(line) for line in (interrupted / "run" / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == [0, 4, 8, 12], "resumed evaluations continue without duplicates"
    assert resumed[-1]["loss"] == records[-1]["loss"] and resumed[-1]["by_ratio"] == records[-1]["by_ratio"]


def test_distillation_and_z_loss_run(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny, objective={"z_loss": 1e-3, "distill": {"weight": 1.0}})
    _, result = finetune(path, "optim.max_steps=4")
    last = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["distill"] > 0 and last["z_loss"] > 0
    assert all(torch.isfinite(torch.tensor(v)) for v in (last["distill"], last["z_loss"], last["diffusion"]))


def test_distillation_teacher_is_the_original_tc_model(strong_tiny, tmp_path):
    recipe, recipe_dir = load_recipe(write_recipe(tmp_path, strong_tiny), [])
    job = Finetune(recipe, recipe_dir)
    original = load_model(strong_tiny)  # the TC checkpoint as shipped
    ids = job.data.input_ids[:2]
    with torch.no_grad():
        job.base.moe_blocks()[0].gate.weight.add_(1.0)  # training has moved the student's routers
        with job.teacher_routing():
            teacher = job.model(input_ids=ids).logits
        student = job.model(input_ids=ids).logits
    assert torch.equal(teacher, original(ids).logits)
    assert not torch.equal(student, teacher)
    assert job.base.moe_blocks()[0].gate.kind == "ec", "the student's router is restored"


# peft asks transformers 5 for a renamed attribute when it wraps a model (a warning for peft's authors)
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_lora_run_writes_a_peft_adapter(strong_tiny, tmp_path):
    from peft import PeftModel

    path = write_recipe(tmp_path, strong_tiny, trainable={"mode": "routers+lora", "lora": {"r": 2}})
    _, result = finetune(path, "optim.max_steps=3")
    adapter = result.output_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(load_model(result.output_dir, merge_adapter=False), str(adapter))
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora and all("self_attn" in n for n in lora)
    # What eval, inspect and the studies load is the trained model: the adapter merged into the weights.
    ids = torch.randint(0, model.config.vocab_size - 2, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        merged = load_model(result.output_dir)(input_ids=ids).logits
        bare = load_model(result.output_dir, merge_adapter=False)(input_ids=ids).logits
    assert torch.allclose(merged, trained, atol=1e-4) and not torch.allclose(bare, trained, atol=1e-4)
    src, out = CheckpointDir(strong_tiny), CheckpointDir(result.output_dir)
    for name in src.weight_map:  # LoRA is not merged: the base tensors are the source's but for routers
        if not name.endswith("mlp.gate.weight"):
            assert torch.equal(src.read([name])[name], out.read([name])[name]), name


def test_nan_loss_stops_with_the_step_and_keeps_a_checkpoint(strong_tiny, tmp_path, monkeypatch):
    import retrofit.training.trainer as trainer

    real = trainer.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        return real(*args) * (float("nan") if calls["n"] == 6 else 1.0)

    monkeypatch.setattr(trainer, "diffusion_loss", poisoned)
    with pytest.raises(RetrofitError, match="loss is nan at step 6"):
        finetune(write_recipe(tmp_path, strong_tiny))
    assert (tmp_path / "run" / "checkpoints" / "step-000005").is_dir()
    assert not (tmp_path / "run" / "config.json").exists(), "no final model from a failed run"


def test_sft_never_masks_the_prompt():
    ids = torch.arange(40).view(2, 20)
    prompt = torch.tensor([5, 12])
    noise = add_noise(ids, prompt, mask_id=99, eps=0.5, generator=torch.Generator().manual_seed(0))
    for b in range(2):
        assert not noise.masked[b, : prompt[b]].any()
        assert noise.masked[b, prompt[b]:].any()
    assert noise.normaliser.tolist() == [15.0, 8.0]


def test_diffusion_loss_equals_a_plain_sum():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=gen)
    ids = torch.randint(0, 11, (2, 6), generator=gen)
    noise = add_noise(ids, torch.tensor([0, 2]), mask_id=10, eps=1e-3, generator=gen)
    expected = 0.0
    for b in range(2):
        seq = 0.0
        for i in range(6):
            if noise.masked[b, i]:
                seq += -torch.log_softmax(logits[b, i], -1)[ids[b, i]].item() / noise.p_mask[b].item()
        expected += seq / (6 - [0, 2][b])
    assert diffusion_loss(logits, ids, noise).item() == pytest.approx(expected / 2, rel=1e-6)


def test_sft_data_from_gsm8k(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny, data={"objective": "sft", "prompt_field": "question",
                                                     "response_field": "answer", "seq_len": 512})
    recipe, recipe_dir = load_recipe(path, [])
    job = Finetune(recipe, recipe_dir)
    assert 190 <= len(job.data) <= 200 and (job.data.prompt_len > 0).all()


def test_unknown_key_names_the_closest_valid_one(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny, optim={"learning_rate": 0.1})
    line = one_line_error(runner.invoke(app, ["validate", str(path)]))
    assert "optim.learning_rate" in line


def test_misspelled_key_suggestion(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny)
    line = one_line_error(runner.invoke(app, ["validate", str(path), "optim.max_step=3"]))
    assert "optim.max_step" in line and "did you mean optim.max_steps" in line


def test_wrong_type_and_missing_file(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny)
    line = one_line_error(runner.invoke(app, ["validate", str(path), "optim.lr=fast"]))
    assert "optim.lr" in line
    line = one_line_error(runner.invoke(app, ["finetune", str(path), "data.path=./missing.jsonl"]))
    assert "missing.jsonl" in line
    line = one_line_error(runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")]))
    assert "recipe not found" in line


def test_empty_data_and_missing_field(strong_tiny, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    path = write_recipe(tmp_path, strong_tiny)
    line = one_line_error(runner.invoke(app, ["finetune", str(path), f"data.path={empty}"]))
    assert "empty" in line
    line = one_line_error(runner.invoke(app, ["finetune", str(path), "data.text_field=body"]))
    assert "no field body" in line


def test_finetune_cli_end_to_end(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny)
    result = runner.invoke(app, ["finetune", str(path), "optim.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "config.json").is_file()
    again = runner.invoke(app, ["finetune", str(path), "optim.max_steps=4"])
    assert "--resume" in one_line_error(again)


def test_shipped_tiny_recipe_runs_from_the_repo_root(tmp_path, monkeypatch):
    """The recipe as shipped, with its own data.path (../shared/data beside the checkout), which
    RETROFIT_SHARED_DATA does not change."""
    monkeypatch.chdir(REPO)  # data.path is relative to the recipe or the working directory
    out = tmp_path / "tiny-ec-ft"
    result = runner.invoke(app, ["finetune", "recipes/tiny-ec.yaml", "optim.max_steps=3", "data.max_examples=64",
                                 f"checkpoint.output_dir={out}"])
    assert result.exit_code == 0, result.output
    model = load_model(out)
    assert model.config.router_settings.type == "ec"


def test_load_balancing_loss_matches_a_loop():
    from retrofit.training.objective import load_balancing_loss

    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, -1)
    share, mean_prob = [0.0] * 4, [0.0] * 4
    for t in range(12):
        for e in probs[t].topk(2).indices.tolist():
            share[e] += 1 / (12 * 2)
        for e in range(4):
            mean_prob[e] += probs[t, e].item() / 12
    expected = 4 * sum(f * p for f, p in zip(share, mean_prob))
    assert load_balancing_loss([logits], 2).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.zeros(8, 4)
    assert load_balancing_loss([uniform], 2).item() == pytest.approx(1.0)


def test_all_parameter_training_from_a_bpe_snapshot(tmp_path):
    from retrofit.tiny import create_tiny

    texts = [json.loads(line) for line in gsm8k_train().read_text().splitlines()[:300]]
    src = create_tiny(tmp_path / "init", tokenizer_texts=[t["question"] + "\n" + t["answer"] for t in texts],
                      vocab_size=400, hidden_size=32, expert_intermediate_size=16)
    tok = json.loads((src / "tokenizer.json").read_text())
    assert {t["content"]: t["id"] for t in tok["added_tokens"]} == {"<|endoftext|>": 0, "<|mask|>": 1}
    path = write_recipe(tmp_path, src, model={"router": {"type": "tc"}}, trainable={"mode": "all"},
                        objective={"balance_loss": 0.01}, data={"text_field": ["question", "answer"]})
    _, result = finetune(path, "optim.max_steps=4")
    a, b = CheckpointDir(src), CheckpointDir(result.output_dir)
    changed = [n for n in a.weight_map if not torch.equal(a.read([n])[n].float(), b.read([n])[n].float())]
    assert len(changed) == len(a.weight_map), "every tensor trains in `all` mode"
    from safetensors.torch import load_file

    assert set(load_file(str(result.output_dir / "router.safetensors"))) == {
        f"model.layers.{i}.mlp.gate.weight" for i in range(2)}
    last = json.loads((result.output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["balance"] >= 1.0 - 1e-6


def test_heldout_unigram_baseline_by_hand():
    from retrofit.heldout import unigram_loss

    train = torch.tensor([[0, 0, 1, 2]])
    heldout = torch.tensor([[0, 2]])
    # add-one counts over a vocabulary of 4: [3, 2, 2, 1] / 8
    expected = -(torch.log(torch.tensor(3 / 8)) + torch.log(torch.tensor(2 / 8))).item() / 2
    assert unigram_loss(train, heldout, 4) == pytest.approx(expected)


def test_activation_checkpointing_gives_the_same_step(strong_tiny, tmp_path, one_thread):
    losses = []
    for flag in (False, True):
        out = tmp_path / f"ckpt-{flag}"
        out.mkdir()
        _, result = finetune(write_recipe(out, strong_tiny), "optim.max_steps=2",
                             f"optim.activation_checkpointing={str(flag).lower()}")
        losses.append(result.losses)
        weights = CheckpointDir(result.output_dir).read(["model.layers.0.mlp.gate.weight"])
        losses[-1].append(weights["model.layers.0.mlp.gate.weight"])
    assert losses[0][:2] == losses[1][:2]
    torch.testing.assert_close(losses[0][2], losses[1][2], atol=1e-6, rtol=1e-5)


def test_convert_refuses_a_source_with_a_lora_adapter(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny, trainable={"mode": "routers+lora", "lora": {"r": 2}})
    _, result = finetune(path, "optim.max_steps=1")
    line = one_line_error(runner.invoke(app, ["convert", "--src", str(result.output_dir), "--router", "tc",
                                              "--out", str(tmp_path / "c")]))
    assert "LoRA adapter" in line and not (tmp_path / "c").exists()


def test_global_batch_that_the_launch_does_not_give_is_refused(strong_tiny, tmp_path):
    path = write_recipe(tmp_path, strong_tiny)
    line = one_line_error(runner.invoke(app, ["finetune", str(path), "optim.global_batch=8"]))
    assert "optim.global_batch is 8, but batch_size 4 × grad_accum 1 × 1 process(es) is 4" in line
    assert not (tmp_path / "run").exists()


def test_balance_loss_of_each_rank_adds_up_to_the_whole_batch():
    """What two data-parallel ranks compute (their halves, the counts summed across them) averages to the
    one-process loss, value and gradient."""
    from retrofit.routers import SOFTMAX
    from retrofit.training.objective import load_balancing_loss

    logits = torch.randn(10, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
    full = load_balancing_loss([logits], 2)
    (whole,) = torch.autograd.grad(full, logits)
    probs = SOFTMAX.scores(logits.detach())
    chosen = torch.zeros_like(probs).scatter(-1, SOFTMAX.top_k(probs, 2)[1], 1.0)
    summed = torch.cat([chosen.sum(0), torch.tensor([10.0])])  # what the all-reduce returns on every rank
    halves = [load_balancing_loss([part], 2, sum_across_ranks=lambda _: summed, world=2)
              for part in (logits[:5], logits[5:])]
    assert torch.allclose(sum(halves) / 2, full)
    (averaged,) = torch.autograd.grad(sum(halves) / 2, logits)
    assert torch.allclose(averaged, whole, atol=1e-7)


@pytest.mark.parametrize("version, mode, message", [
    (1, "routers", "FSDP version 1 cannot train the routers alone beside frozen weights; set fsdp_version: 2"),
    (2, "all", "trainable.mode all is not supported under FSDP"),
])
def test_fsdp_settings_it_cannot_train_with_are_refused(version, mode, message):
    """accelerate builds an FSDP version 1 plugin only where there is an accelerator device, so the refusal is
    checked on the settings alone."""
    job = SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(
        fsdp_version=version))), recipe=SimpleNamespace(trainable=SimpleNamespace(mode=mode)))
    with pytest.raises(RetrofitError, match=message):
        Finetune.check_sharding(job)
