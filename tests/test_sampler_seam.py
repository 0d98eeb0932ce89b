"""The sampler seam, proved by a toy defined only here ("left to right": one position per step, in order, the
argmax; its own option ``--toy-stride``): one settings class and its Sampler subclass, plus one registry line.
Its flag appears in `retrofit eval --help` and `retrofit inspect --help` with one default, and a model family
that names it generates with it through the unchanged commands."""

from __future__ import annotations

import importlib
import json
from typing import Literal

import pytest
import torch
from pydantic import Field

from retrofit.eval.sampler_base import Sampler, SamplerSettings
from retrofit.eval.samplers import SAMPLERS, register_sampler
from retrofit.models.llada_moe import LLADA_MOE
from tests.helpers import runner


class LeftToRightSettings(SamplerSettings):
    type: Literal["left-to-right"] = "left-to-right"
    toy_stride: int = Field(default=1, ge=1, description="positions filled per step")


class LeftToRightArgs:
    def __init__(self, gen_length: int, denoise_block: int, stride: int):
        self.gen_length, self.denoise_block, self.stride = gen_length, denoise_block, stride

    def check(self) -> None:
        pass


class LeftToRight(Sampler):
    kind = "left-to-right"
    display_name = "left-to-right"
    settings_class = LeftToRightSettings

    def arguments(self, options: LeftToRightSettings) -> LeftToRightArgs:
        return LeftToRightArgs(options.gen_length, options.denoise_block or options.gen_length, options.toy_stride)

    def generate(self, model, prompts, mask_id, eos_id, generators=None, device="cpu"):
        calls.append(self.settings.stride)
        out = []
        for prompt in prompts:  # one at a time: a toy needs no padding
            x = torch.tensor([prompt + [mask_id] * self.gen_length], device=device)
            for lo in range(len(prompt), x.shape[1], self.settings.stride):
                hi = min(lo + self.settings.stride, x.shape[1])
                x[:, lo:hi] = model(input_ids=x).logits[:, lo:hi].argmax(-1)
            out.append(x[0, len(prompt):])
        return torch.stack(out)


calls: list[int] = []


@pytest.fixture
def toy_sampler(monkeypatch):
    """Registered, named by LLaDA-MoE for this test, and the command line rebuilt so that its flags are generated
    from the toy's settings too."""
    import retrofit.cli

    register_sampler(LeftToRight)  # the one registry line a new sampler needs
    monkeypatch.setattr(type(LLADA_MOE), "sampler", LeftToRight.kind)
    calls.clear()
    yield importlib.reload(retrofit.cli).app
    SAMPLERS.pop(LeftToRight.kind)
    importlib.reload(retrofit.cli)


def test_the_toys_option_is_a_flag_of_eval_and_inspect_with_one_default(toy_sampler):
    for command in ("eval", "inspect"):
        text = " ".join(runner.invoke(toy_sampler, [command, "--help"]).output.split())  # unwrapped
        assert "--toy-stride <int> left-to-right: positions filled per step. [default: 1]" in text
        assert "--gen-length <int> llada/llada2/llada2.1/left-to-right: tokens to generate. [default: 256]" in text
        assert text.count("--gen-length") == 1


def test_a_family_that_names_the_toy_generates_with_it(toy_sampler, tiny_dir, tmp_path, shared_data):
    out = tmp_path / "e.json"
    result = runner.invoke(toy_sampler, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--limit", "1",
                                         "--data-dir", str(shared_data), "--gen-length", "8", "--toy-stride", "4",
                                         "--no-figures", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert calls == [4]
    sampler = json.loads(out.read_text())["settings"]["sampler"]
    assert sampler["name"] == "left-to-right" and sampler["stride"] == 4 and sampler["gen_length"] == 8
    # Another sampler's option is refused by name, and the toy's own is refused for the others' families.
    refused = runner.invoke(toy_sampler, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--threshold", "0.9",
                                          "--output", str(out)])
    assert refused.exit_code == 1 and "--cache, --cache-refresh and --threshold are options of the LLaDA/LLaDA2.0/LLaDA2.1 sampler" in \
        refused.output and "samples with left-to-right's" in refused.output
