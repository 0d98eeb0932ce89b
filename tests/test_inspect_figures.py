"""`retrofit inspect` figures and report from a synthetic routing.json: every figure is drawn as a real PNG with both
models in it, report.md links each figure and names each model, and drawing leaves the input untouched."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from retrofit.inspect.figures import FIGURES, draw_all, load_cv
from retrofit.inspect.report import write_report

EXPERTS, TOP_K, LAYERS, TOKENS = 8, 2, 2, 256
RATIOS = [0.1, 0.5, 0.9]


def _layer(loads, histogram, expected_k: float, gates: float, capacity_per_routing) -> dict:
    realised = float(np.dot(np.arange(EXPERTS + 1), histogram) / TOKENS)
    return {"tokens_per_expert": [int(x) for x in loads], "experts_per_token_histogram": [int(x) for x in histogram],
            "tokens_with_zero_experts": int(histogram[0]), "unique_experts": float(np.count_nonzero(loads)),
            "unique_experts_per_block": float(min(EXPERTS, np.count_nonzero(loads) - 1)),
            "gate_mass_per_token": gates, "capacity_per_routing": capacity_per_routing, "expected_k": expected_k,
            "realised_k": realised, "tokens": TOKENS}


def _tc_layer(layer: int, ratio: float) -> dict:
    """Token choice: exactly top_k experts per token, a flat-ish load, gates summing to 1."""
    loads = np.full(EXPERTS, TOKENS * TOP_K // EXPERTS) + np.array([3, -3, 2, -2, 1, -1, 0, 0]) * (layer + 1)
    histogram = np.zeros(EXPERTS + 1, dtype=int)
    histogram[TOP_K] = TOKENS
    return _layer(loads, histogram, float(TOP_K), 1.0, None)


def _ec_layer(layer: int, ratio: float) -> dict:
    """Expert choice: k(r) grows with the mask ratio, tokens spread from 0 to 5 experts, some get none."""
    zero = int(40 * (1 - ratio)) + 8 * layer
    histogram = np.array([zero, 60, 50, 40, 30, 20, 0, 0, 0])
    histogram[1] += TOKENS - histogram.sum()
    work = int(np.dot(np.arange(EXPERTS + 1), histogram))
    loads = np.full(EXPERTS, work // EXPERTS)
    loads[0] += work - loads.sum()
    k = 1.0 + 2.0 * ratio
    return _layer(loads, histogram, k, 0.6 + 0.3 * ratio, k * TOKENS / EXPERTS)


def _model(label: str, router: dict, make) -> dict:
    return {"label": label, "path": f"/models/{label}", "family": "llada-moe", "router": router,
            "num_experts": EXPERTS, "top_k": TOP_K, "num_layers": LAYERS,
            "buckets": [{"mask_ratio": r, "layers": [make(i, r) for i in range(LAYERS)]} for r in RATIOS]}


@pytest.fixture
def routing() -> dict:
    return {"version": 1,
            "settings": {"data": "/data/text.jsonl", "limit": 4, "seq_len": 64, "seed": 0, "mask_ratios": RATIOS,
                         "block_length": 32},
            "models": [_model("tiny (tc)", {"type": "tc"}, _tc_layer),
                       _model("tiny (ec)", {"type": "ec", "schedule": "linear"}, _ec_layer)]}


def test_every_figure_is_a_png(routing, tmp_path):
    paths = draw_all(routing, tmp_path / "figures")
    assert [p.stem for p in paths] == [f.__name__ for f in FIGURES]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG"), path
        assert len(data) > 5 * 1024, (path, len(data))


def test_report_embeds_figures_and_names_models(routing, tmp_path):
    paths = draw_all(routing, tmp_path / "figures")
    report = write_report(routing, paths, tmp_path)
    text = report.read_text()
    assert report == tmp_path / "report.md"
    for path in paths:
        assert f"](figures/{path.name})" in text, path.name
    for model in routing["models"]:
        assert model["label"] in text
    assert "ec (schedule=linear)" in text


def test_drawing_does_not_mutate_input(routing, tmp_path):
    before = copy.deepcopy(routing)
    write_report(routing, draw_all(routing, tmp_path), tmp_path)
    assert routing == before


def test_load_cv_tells_flat_from_skewed(routing):
    # tc's load is near flat (small CV); a layer with all tokens on one expert has the largest CV, sqrt(E - 1).
    assert np.all(load_cv(routing["models"][0]) < 0.1)
    skewed = copy.deepcopy(routing["models"][0])
    for bucket in skewed["buckets"]:
        bucket["layers"][0]["tokens_per_expert"] = [TOKENS] + [0] * (EXPERTS - 1)
    assert load_cv(skewed)[0] == pytest.approx(np.sqrt(EXPERTS - 1))


def test_no_models_is_an_error(routing, tmp_path):
    with pytest.raises(ValueError, match="no models"):
        draw_all({**routing, "models": []}, tmp_path)
