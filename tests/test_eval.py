"""The lm-eval adapter: likelihoods, the sampler, offline tasks and `retrofit eval` end to end."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import retrofit
from retrofit.cli import app
from retrofit.eval.adapter import RetrofitLM
from retrofit.eval.likelihood import mc_loglikelihood, request_seed
from retrofit.eval.sampler_llada import GenerateArgs, apply_stop, generate, transfer_schedule
from retrofit.eval.sharded import LockstepModel
from retrofit.models import FAMILIES
from retrofit.routers import router_settings
from retrofit.tiny import build_tiny_model
from tests.helpers import Request, one_line_error, runner, shared_data_dir, tiny_snapshot, write_arc_mmlu


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    path = tiny_snapshot(tmp_path_factory.mktemp("eval") / "tiny", seed=3)
    return RetrofitLM(str(path), mc_num=64, batch_size=16, gen_length=16, steps=8, denoise_block=8, progress=False)


def exact_expectation(model, context, continuation, mask_id) -> float:
    """E over l ~ U{1..L} and a uniform l-subset of (L/l)·Σ CE — enumerated, no sampling."""
    length = len(continuation)
    total = 0.0
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        for subset in subsets:
            ids = torch.tensor([context + continuation])
            for i in subset:
                ids[0, len(context) + i] = mask_id
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            ce = sum(-logp[len(context) + i, continuation[i]].item() for i in subset)
            total += (length / count) * ce / len(subsets) / length
    return -total


def test_single_token_loglikelihood_is_exact(lm):
    context = lm.tokenizer("Hell")["input_ids"]
    options = [lm.tokenizer(c)["input_ids"][0] for c in "o!?"]
    scores = lm.loglikelihood([Request("Hell", "o"), Request("Hell", "!"), Request("Hell", "?")])
    ids = torch.tensor([context + [lm.mask_id]])
    with torch.no_grad():
        logp = F.log_softmax(lm.model(input_ids=ids).logits[0, -1].double(), -1)
    for (ll, greedy), option in zip(scores, options):
        assert ll == pytest.approx(logp[option].item(), abs=1e-5)
        assert greedy == (option == int(logp.argmax()))


def test_mc_loglikelihood_estimates_the_exact_expectation(lm):
    context, continuation = [10, 20, 30, 40], [50, 60, 70]
    exact = exact_expectation(lm.model, context, continuation, lm.mask_id)
    estimate = mc_loglikelihood(lm.model, context, continuation, lm.mask_id, mc_num=768, batch_size=64, seed=0,
                                device="cpu")
    assert estimate == pytest.approx(exact, rel=0.03)


def test_loglikelihood_is_seeded_and_independent_of_batching(lm):
    a = lm.loglikelihood([Request("Question: 2+2\nAnswer:", " four"), Request("x", " yz")])
    b = lm.loglikelihood([Request("x", " yz")])
    c = lm.loglikelihood([Request("Question: 2+2\nAnswer:", " four"), Request("x", " yz")])
    # The same requests: the same scores, bit for bit. A request alone runs in narrower forwards (no padding):
    # the same up to fp32 rounding (test_batched_likelihood holds fp64 to 1e-12).
    assert a == c and a[1][1] == b[0][1] and a[1][0] == pytest.approx(b[0][0], rel=1e-6)


def test_rolling_loglikelihood_is_negative_and_deterministic(lm):
    first = lm.loglikelihood_rolling([Request("The cat sat.")])
    assert first == lm.loglikelihood_rolling([Request("The cat sat.")]) and first[0] < 0


class CountingModel(torch.nn.Module):
    """Wraps a model and records how many mask tokens each forward pass sees."""

    def __init__(self, model, mask_id):
        super().__init__()
        self.model, self.mask_id, self.seen = model, mask_id, []

    def forward(self, input_ids, **kwargs):
        self.seen.append(int((input_ids == self.mask_id).sum()))
        return self.model(input_ids=input_ids, **kwargs)


def test_generation_fills_gen_length_with_an_equal_share_per_step(lm):
    prompt = torch.tensor([[72, 105, 33, 32]] * 2)
    settings = GenerateArgs(gen_length=12, steps=6, denoise_block=6)
    counting = CountingModel(lm.model, lm.mask_id)
    out = generate(counting, prompt, lm.mask_id, settings)
    assert out.shape == (2, 4 + 12) and torch.equal(out[:, :4], prompt)
    assert not (out == lm.mask_id).any(), "every mask is filled"
    # Two blocks of 6 positions, 3 steps each: 2 positions per sequence per step, block by block.
    assert counting.seen == [2 * m for m in (12, 10, 8, 6, 4, 2)]


def test_transfer_schedule_splits_evenly():
    assert transfer_schedule(torch.tensor([7, 6]), 3).tolist() == [[3, 2, 2], [2, 2, 2]]


def test_stop_strings_cut_the_text():
    assert apply_stop("12 apples\nQuestion: next", ["Question:", "</s>"]) == "12 apples\n"
    assert apply_stop("no stop here", ["Question:"]) == "no stop here"


def test_generate_until_respects_stop_strings(lm):
    free = lm.generate_until([Request("Q: 1+1\nA:", {"until": []})])[0]
    assert free, "the tiny model produces some text"
    stop = free[len(free) // 2]
    cut = lm.generate_until([Request("Q: 1+1\nA:", {"until": [stop]})])[0]
    assert stop not in cut and free.startswith(cut)


def test_router_can_be_overridden_at_eval_time(lm, caplog):
    import logging

    block = RetrofitLM(str(lm.path), router="block", guard_size=2, gen_length=16, denoise_block=8, steps=8,
                       block_length=4, progress=False)
    assert block.router.type == "block" and block.router.block_length == 4, "the router's own block length"
    assert {b.gate.kind for b in block.model.moe_blocks()} == {"block"}
    # The sampler's block only decides denoising; the router keeps its own (32 by default, dMoE's).
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        default = RetrofitLM(str(lm.path), router="block", guard_size=2, gen_length=16, denoise_block=16, steps=8,
                             progress=False)
    assert default.router.block_length == 32
    assert any("not a multiple of the router's block length 32" in r.getMessage() for r in caplog.records)
    ec = RetrofitLM(str(lm.path), router="ec", capacity_factor=2.0, progress=False)
    assert ec.router.capacity_factor == 2.0


def test_lm_eval_registry_finds_retrofit():
    from lm_eval.api.registry import get_model

    assert get_model("retrofit") is RetrofitLM


@pytest.mark.slow
def test_start_up_hook_registers_without_importing_torch():
    hook_dir = Path(retrofit.__file__).parent / "eval" / "startup"
    code = ("import sys; sys.path.insert(0, %r); import retrofit_lm_eval_hook; heavy = 'torch' in sys.modules; "
            "from lm_eval.api.registry import get_model; "
            "print(heavy, get_model('retrofit').__name__, get_model('hf').__name__)") % str(hook_dir)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "RetrofitLM", "HFLM"]


def test_eval_gsm8k_end_to_end(lm, tmp_path, shared_data):
    out = tmp_path / "gsm8k.json"
    result = runner.invoke(app, ["eval", "--model", str(lm.path), "--tasks", "gsm8k", "--limit", "3", "--data-dir",
                                 str(shared_data), "--gen-length", "16", "--steps", "4", "--denoise-block", "8",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert set(record["results"]["gsm8k"]) >= {"exact_match[strict-match]", "exact_match[flexible-extract]"}
    assert record["results"]["gsm8k"]["num_fewshot"] == 5
    assert record["model"] == str(lm.path) and len(record["weights_sha256"]) == 64
    assert record["router"]["type"] == "tc" and record["settings"]["sampler"]["gen_length"] == 16
    assert record["lm_eval_version"].startswith("0.4")
    assert record["routing"]["unique_experts"] > 0
    assert "exact_match" in result.output
    figures = tmp_path / "gsm8k-routing"  # the routing the run recorded, drawn beside the JSON
    routing = json.loads((figures / "routing.json").read_text())
    assert routing["settings"]["source"] == "tasks" and routing["models"][0]["scores"] == record["results"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in figures.glob("*.png")) and len(list(figures.glob("*.png"))) >= 5
    assert "gsm8k" in (figures / "report.md").read_text()


def test_eval_arc_and_mmlu_on_local_files(lm, tmp_path):
    data = write_arc_mmlu(tmp_path / "data")
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--model", str(lm.path), "--tasks", "arc,mmlu", "--mc-num", "2",
                                 "--data-dir", str(data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text())["results"]
    assert {"arc_challenge", "arc_easy", "mmlu", "mmlu_anatomy", "mmlu_astronomy"} <= set(results)
    assert results["mmlu"]["num_fewshot"] == 5 and results["arc_easy"]["num_fewshot"] == 0
    for task in ("arc_challenge", "arc_easy", "mmlu"):
        assert 0.0 <= results[task]["acc"] <= 1.0


@pytest.mark.slow
def test_eval_errors_are_one_line(lm, tmp_path):
    assert "unknown task 'nosuchtask'" in one_line_error(runner.invoke(app, ["eval", "--model", str(lm.path), "--tasks",
                                                                      "nosuchtask"]))
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(lm.path), "--tasks", "arc", "--data-dir",
                                        str(tmp_path)]))
    assert "no local data for arc_challenge" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", "./missing", "--tasks", "gsm8k"]))
    assert "no such directory" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(lm.path), "--tasks", "gsm8k", "--gen-length", "10",
                                        "--denoise-block", "4", "--data-dir", str(shared_data_dir())]))
    assert "multiple of the denoising block" in line


def test_request_seed_depends_on_the_request_only():
    assert request_seed(0, [1, 2], [3]) == request_seed(0, [1, 2], [3]) != request_seed(0, [1, 2], [4])


def test_bfloat16_weights_on_request(lm):
    bf16 = RetrofitLM(str(lm.path), dtype="bfloat16", progress=False)
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert next(lm.model.parameters()).dtype == torch.float32, "auto is fp32 on a CPU"
    (ll, _), = bf16.loglikelihood([Request("Hell", "o")])
    (ref, _), = lm.loglikelihood([Request("Hell", "o")])
    assert abs(ll - ref) < 0.1


def _full_logits_generate(model, prompt, mask_id, settings):
    """The sampler as LLaDA's generate.py writes it: logits of every position, later blocks set to −inf."""
    x = torch.cat([prompt, torch.full((prompt.shape[0], settings.gen_length), mask_id)], dim=1)
    blocks = settings.gen_length // settings.denoise_block
    per_block = settings.steps // blocks
    for block in range(blocks):
        lo = prompt.shape[1] + block * settings.denoise_block
        hi = lo + settings.denoise_block
        schedule = transfer_schedule((x[:, lo:hi] == mask_id).sum(1), per_block)
        for step in range(per_block):
            with torch.no_grad():
                logits = model(input_ids=x).logits
            candidate = logits.argmax(-1)
            confidence = F.softmax(logits.float(), -1).gather(-1, candidate.unsqueeze(-1)).squeeze(-1)
            confidence[:, hi:] = float("-inf")
            confidence = torch.where(x == mask_id, confidence, torch.tensor(float("-inf")))
            for row in range(x.shape[0]):
                chosen = confidence[row].topk(int(schedule[row, step])).indices
                x[row, chosen] = candidate[row, chosen]
    return x


def test_sampler_scoring_only_the_block_matches_full_logits(lm):
    prompt = torch.tensor([[72, 105, 33, 32, 50], [10, 20, 30, 40, 50]])
    settings = GenerateArgs(gen_length=16, steps=8, denoise_block=8)
    ours = generate(lm.model, prompt.clone(), lm.mask_id, settings)
    assert torch.equal(ours, _full_logits_generate(lm.model, prompt.clone(), lm.mask_id, settings))
    ids = torch.cat([prompt, torch.full((2, 6), lm.mask_id)], dim=1)
    with torch.no_grad():
        kept = lm.model(input_ids=ids, logits_to_keep=slice(5, 11)).logits
        assert torch.allclose(kept, lm.model(input_ids=ids).logits[:, 5:11], atol=1e-6)


def test_the_demo_block_row_is_one_command_line(shared_data, tmp_path):
    """The demo's "block (32, guard 2)" variant, reproduced from the command line with the router flags."""
    from retrofit.routers import router_settings

    out = tmp_path / "block.json"
    result = runner.invoke(app, ["eval", "--model", "tiny", "--tasks", "gsm8k", "--limit", "1", "--data-dir",
                                 str(shared_data), "--gen-length", "32", "--steps", "32", "--denoise-block", "32",
                                 "--router", "block", "--block-length", "32", "--guard-size", "2",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["router"] == router_settings(type="block", guard_size=2).model_dump()
    assert record["settings"]["sampler"]["denoise_block"] == 32
    assert record["routing"]["unique_experts_per_block"] < 8


def test_lm_eval_model_args_are_checked_by_name_and_type(lm):
    """model_args reach the adapter as strings: router settings are typed by their flags, and a misspelt or
    mistyped one is an error that names it (never silently ignored)."""
    from retrofit.errors import RetrofitError

    with pytest.raises(RetrofitError, match="unknown model_args 'capacity_factr'; did you mean capacity_factor"):
        RetrofitLM(str(lm.path), router="ec", capacity_factr="2", progress=False)
    with pytest.raises(RetrofitError, match="model_args capacity_factor='lots': expected float"):
        RetrofitLM(str(lm.path), router="ec", capacity_factor="lots", progress=False)
    typed = RetrofitLM(str(lm.path), router="ec", capacity_factor="2", per_batch="true", progress=False)
    assert typed.router.capacity_factor == 2.0 and typed.router.per_batch is True


def test_llada2_sampler_options_are_refused_for_llada(shared_data):
    line = one_line_error(runner.invoke(app, ["eval", "--model", "tiny", "--tasks", "gsm8k", "--data-dir",
                                              str(shared_data), "--sampling", "greedy"]))
    assert "--sampling is an option of the LLaDA2.0 sampler" in line


@pytest.mark.parametrize("kind", ["tc", "ec", "block"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_rank_done_under_fsdp_joins_with_filler_forwards_that_count_nothing(monkeypatch, family, kind):
    """A rank that has finished its share keeps joining the others' forwards (here: two more) with a one-token
    forward, under every router and family, and the routing statistics do not move."""
    model = build_tiny_model(router=router_settings(type=kind), family=FAMILIES[family])
    model.enable_routing_stats()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7, 8, model.config.mask_token_id]]))
    before = model.routing_stats().as_dict()
    lockstep = LockstepModel(model, torch.device("cpu"))
    others_busy = iter([True, True, False])
    monkeypatch.setattr(lockstep, "_anyone_busy", lambda busy: next(others_busy))
    lockstep.finish()
    assert next(others_busy, "all asked") == "all asked"
    assert model.routing_stats().as_dict() == before and before["tokens"] > 0
