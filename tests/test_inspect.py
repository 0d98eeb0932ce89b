"""`retrofit inspect`'s statistics against a slow count of the routings themselves, and its command line."""

from __future__ import annotations

from collections import Counter

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
    from retrofit.eval.heldout import text_sequences
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
