"""`retrofit inspect`'s statistics against a slow count of the routings themselves, and its command line."""

from __future__ import annotations

import json
from collections import Counter

import pytest

import torch

from retrofit.cli import app
from retrofit.inspect.gather import Subject, gather, noised
from retrofit.io.load import load_model
from retrofit.routers import router_settings
from tests.helpers import one_line_error, runner


def slow_counts(model, sequences, ratio, mask_id, seed):
    """Per MoE layer: expert load, experts-per-token histogram, gate mass, from the routings a hook captures,
    counted one (token, expert, gate) triple at a time."""
    captured = {i: [] for i in range(len(model.moe_blocks()))}
    hooks = [block.gate.register_forward_hook(lambda m, a, routing, i=i: captured[i].append(routing))
             for i, block in enumerate(model.moe_blocks())]
    noisy = noised(sequences, ratio, mask_id, seed)
    with torch.no_grad():
        for start in range(0, len(noisy), 8):
            batch = noisy[start:start + 8]
            model(input_ids=batch, mask_ratio=torch.full((len(batch),), ratio))
    for hook in hooks:
        hook.remove()
    out = []
    for routings in captured.values():
        load, per_token, mass, tokens = Counter(), Counter(), 0.0, 0
        for offset, routing in enumerate(routings):
            for token, expert, gate in zip(*(t.tolist() for t in routing.pairs())):
                load[expert] += 1
                per_token[(offset, token)] += 1
                mass += gate
            tokens += routing.logits.shape[0]
        histogram = Counter(per_token.values())
        histogram[0] = tokens - len(per_token)
        out.append((load, histogram, mass / tokens, tokens))
    return out


def test_routing_json_matches_a_slow_count(tmp_path, shared_data):
    from retrofit.heldout import text_sequences
    from retrofit.io.tokenizer_files import load_tokenizer
    from retrofit.sources import resolve_source

    data = shared_data / "gsm8k" / "test.jsonl"
    subjects = [Subject("tiny", None), Subject("tiny", router_settings(type="ec"))]
    record = gather(subjects, data, ["question", "answer"], limit=16, seq_len=64, seed=3, ratios=(0.2, 0.8))
    path = resolve_source("tiny").path
    sequences = text_sequences(load_tokenizer(path), data, ["question", "answer"], seq_len=64, max_examples=16)
    for subject, entry in zip(subjects, record["models"]):
        model = load_model(path, router=subject.router)
        for i, bucket in enumerate(entry["buckets"]):
            slow = slow_counts(model, sequences, bucket["mask_ratio"], model.config.mask_token_id, 3 + i)
            for layer, (load, histogram, mass, tokens) in zip(bucket["layers"], slow):
                assert layer["tokens_per_expert"] == [load[e] for e in range(8)]
                assert layer["experts_per_token_histogram"] == [histogram[n] for n in range(9)]
                assert abs(layer["gate_mass_per_token"] - mass) < 1e-4 and layer["tokens"] == tokens
    tc, ec = record["models"]
    tc_layers = [layer for b in tc["buckets"] for layer in b["layers"]]
    assert all(layer["experts_per_token_histogram"][2] == layer["tokens"] for layer in tc_layers), "TC: exactly k"
    assert any(layer["tokens_with_zero_experts"] > 0 for b in ec["buckets"] for layer in b["layers"])


def test_inspect_writes_json_figures_and_report(tmp_path, shared_data):
    out = tmp_path / "inspect"
    result = runner.invoke(app, ["inspect", "--model", "tiny", "--router", "tc", "--router", "ec", "--router", "block",
                                 "--guard-size", "2", "--data", str(shared_data / "gsm8k" / "test.jsonl"),
                                 "--limit", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "routing.json").is_file() and (out / "report.md").is_file()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 5 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    assert "tiny (block)" in result.output


def test_inspect_refuses_bad_input_in_one_line(tmp_path, shared_data):
    data = str(shared_data / "gsm8k" / "test.jsonl")
    assert "--limit 0" in one_line_error(runner.invoke(app, ["inspect", "--limit", "0", "--data", data]))
    assert "no such file" in one_line_error(runner.invoke(app, ["inspect", "--data", str(tmp_path / "none.jsonl")]))
    assert "need --router" in one_line_error(runner.invoke(app, ["inspect", "--data", data, "--guard-size", "2"]))
    line = one_line_error(runner.invoke(app, ["inspect", "--model", "./nowhere", "--data", data,
                                              "--out", str(tmp_path / "o")]))
    assert "no such directory" in line


def slow_bucket_loads(captured, ratios, experts):
    """Per bucket: tokens per expert of layer 0, each sequence of each captured forward sent to the nearest ratio."""
    loads = {r: [0] * experts for r in ratios}
    for ctx, routing in captured:
        length = ctx.valid.shape[1]
        for token, expert in zip(*(t.tolist() for t in routing.pairs()[:2])):
            row = token // length
            if ctx.valid[row, token % length]:
                nearest = min(ratios, key=lambda r: abs(r - float(ctx.mask_ratio[row])))
                loads[nearest][expert] += 1
    return loads


def test_routing_during_sampling_matches_a_slow_count(shared_data):
    """What the sampler's forwards record, bucket by bucket, against the routings a hook captured."""
    from retrofit.eval.adapter import RetrofitLM
    from retrofit.eval.runner import run_eval
    from retrofit.inspect.gather import sampled_entry
    from retrofit.routers.stats import MASK_RATIOS

    lm = RetrofitLM("tiny", router=router_settings(type="ec"), gen_length=16, steps=8, denoise_block=8,
                    progress=False)
    captured = []
    lm.model.moe_blocks()[0].gate.register_forward_hook(lambda m, args, routing: captured.append((args[1], routing)))
    record = run_eval(lm, ["gsm8k"], limit=2, data_dir=shared_data)
    entry = sampled_entry(lm)
    slow = slow_bucket_loads(captured, MASK_RATIOS, 8)
    assert [b["mask_ratio"] for b in entry["buckets"]] == [r for r in MASK_RATIOS if sum(slow[r])]
    assert len(entry["buckets"]) >= 3, "the sampler's forwards span the mask ratios"
    for bucket in entry["buckets"]:
        assert bucket["layers"][0]["tokens_per_expert"] == slow[bucket["mask_ratio"]]
    total = [sum(b["layers"][0]["tokens_per_expert"][e] for b in entry["buckets"]) for e in range(8)]
    assert total == lm.model.moe_blocks()[0].stats.merged().tokens_per_expert.tolist()
    assert record["routing"]["routings"] == len(captured) * len(lm.model.moe_blocks())


@pytest.mark.slow
def test_inspect_records_during_tasks(tmp_path, shared_data):
    out = tmp_path / "sampled"
    result = runner.invoke(app, ["inspect", "--model", "tiny", "--router", "tc", "--router", "block", "--guard-size",
                                 "2", "--tasks", "gsm8k", "--data-dir", str(shared_data), "--limit", "2",
                                 "--gen-length", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "routing.json").read_text())
    assert record["settings"]["source"] == "tasks" and record["settings"]["block_length"] == 32
    tc, block = record["models"]
    assert "gsm8k" in tc["scores"] and "gsm8k" in block["scores"]

    def per_block(model):
        layers = [layer for b in model["buckets"] for layer in b["layers"]]
        return sum(layer["unique_experts_per_block"] for layer in layers) / len(layers)

    assert per_block(block) < per_block(tc) / 2, "block routing keeps few experts per denoising block"
    assert len(list(out.glob("*.png"))) >= 5
    assert "Recorded while lm-eval ran gsm8k" in (out / "report.md").read_text()


def test_inspect_tasks_refuses_bad_input_in_one_line(tmp_path, shared_data):
    assert "--tasks is empty" in one_line_error(runner.invoke(app, ["inspect", "--tasks", ","]))
    line = one_line_error(runner.invoke(app, ["inspect", "--tasks", "nosuchtask", "--data-dir", str(shared_data),
                                              "--out", str(tmp_path / "o")]))
    assert "unknown task 'nosuchtask'" in line
