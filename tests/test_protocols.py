"""Published evaluation protocols as presets: every preset validates and runs on a tiny model, flags override it,
`--protocol list` and the README table show them, and dMoE's answer extraction scores canned answers as dMoE's
code does."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from retrofit.cli import app
from retrofit.eval.protocols import describe, load_protocol, protocol_names, protocol_table, protocols
from retrofit.eval.protocols.tasks import dmoe_scoring
from retrofit.eval.runner import prepared_tasks
from retrofit.eval.samplers import settings_of
from retrofit.models import FAMILIES
from tests.helpers import one_line_error, runner, shared_data_dir, tiny_snapshot

README = Path(__file__).parent.parent / "README.md"
# Small enough for a tiny model on a CPU; everything else comes from the preset.
TINY_OVERRIDES = {"llada2": ["--gen-length", "16", "--steps", "8", "--denoise-block", "8"],
                  "llada-moe": ["--gen-length", "16", "--denoise-block", "8"]}


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocols")
    return {name: tiny_snapshot(root / name, family=family, seed=2) for name, family in FAMILIES.items()}


def test_there_are_the_published_protocols():
    assert protocol_names() == ["dinfer-llada-moe", "dmoe-zeroshot-cot", "llada2-report"]


@pytest.mark.parametrize("name", protocol_names())
def test_every_preset_validates(name):
    protocol = load_protocol(name)
    family = FAMILIES[protocol.family]
    assert set(protocol.checkpoints) <= set(family.hub_models)
    assert {score.checkpoint for score in protocol.published} <= set(protocol.checkpoints)
    assert {score.task for score in protocol.published} <= set(protocol.tasks)
    kind = protocol.sampler_name or family.sampler
    settings_of(kind, protocol.sampler)  # every option is the sampler's and in range
    protocol.chat.resolved()
    with prepared_tasks(protocol.tasks, shared_data_dir()) as prepared:  # every task has its offline variant
        assert set(prepared.local) == set(prepared.names)


@pytest.mark.slow
@pytest.mark.parametrize("name", protocol_names())
def test_every_preset_runs_on_tiny(tmp_path, snapshots, name):
    protocol = load_protocol(name)
    output = tmp_path / "out.json"
    result = runner.invoke(app, ["eval", "--model", str(snapshots[protocol.family]), "--protocol", name, "--limit", "1",
                                 "--mc-num", "1", "--data-dir", str(shared_data_dir()), "--no-figures", "--log-samples",
                                 "--output", str(output), *TINY_OVERRIDES[protocol.family]])
    assert result.exit_code == 0, result.output
    record = json.loads(output.read_text())
    settings = record["settings"]
    assert settings["protocol"] == {"name": name, "version": protocol.version}
    assert settings["chat"] == protocol.chat.resolved().model_dump()
    assert settings["num_fewshot"] == protocol.num_fewshot
    kept = {k: v for k, v in protocol.sampler.items() if f"--{k.replace('_', '-')}" not in TINY_OVERRIDES[protocol.family]}
    sampler = settings["sampler"]
    for key, value in kept.items():  # the preset's options reached the sampler (named by its arguments)
        argument = {"early_stop": "eos_early_stop"}.get(key, key)
        assert sampler[argument] == value, (key, sampler)
    assert sampler["gen_length"] == 16 and sampler["denoise_block"] == 8  # the flags won
    for score in protocol.published:
        assert score.metric in record["results"][score.task]
    prompts = [json.loads(line)["arguments"] for line in
               output.with_name("out-samples.jsonl").read_text().splitlines()]
    assert prompts and all("<role>HUMAN</role>" in json.dumps(p) for p in prompts)  # every preset is a chat one


def test_flags_override_the_preset():
    protocol = load_protocol("dmoe-zeroshot-cot")
    untouched = protocol.merged({})
    assert untouched["tasks"] == "gsm8k_dmoe,arc_challenge_dmoe" and untouched["num_fewshot"] == 0
    assert untouched["apply_chat_template"] is True and untouched["fewshot_as_multiturn"] is False
    assert untouched["sampler_options"]["threshold"] == 0.95 and untouched["sampler"] is None
    given = protocol.merged({"tasks": "gsm8k_dmoe", "num_fewshot": 2, "apply_chat_template": False,
                             "sampler_options": {"threshold": 0.8}, "sampler": "llada2.1"})
    assert given["tasks"] == "gsm8k_dmoe" and given["num_fewshot"] == 2 and given["apply_chat_template"] is False
    assert given["sampler_options"] == {**protocol.sampler, "threshold": 0.8} and given["sampler"] == "llada2.1"


def test_protocol_errors_are_one_line(snapshots):
    line = one_line_error(runner.invoke(app, ["eval", "--model", "tiny", "--protocol", "nosuch"]))
    assert "no protocol named 'nosuch'" in line and "dmoe-zeroshot-cot" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(snapshots["llada-moe"]), "--protocol",
                                              "dmoe-zeroshot-cot", "--data-dir", str(shared_data_dir())]))
    assert "published for llada2 checkpoints" in line and "LLaDA-MoE checkpoint" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", "tiny"]))
    assert "--tasks is needed" in line and "--protocol list" in line


def test_protocol_list_describes_every_preset():
    result = runner.invoke(app, ["eval", "--protocol", "list"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for protocol in protocols():
        assert " ".join(" ".join(describe(protocol)).split()) in text


def test_readme_table_is_the_presets():
    section = README.read_text().split("<!-- protocols -->")[1]
    assert section.strip() == protocol_table().strip()


# --- dMoE's extraction, on canned answers (expected values from dMoE's eval_gsm8k.py / eval_arc.py rules) --------


GSM8K_DOC = {"question": "q", "answer": "... #### 1,018"}


@pytest.mark.parametrize("text,strict,soft", [
    ("So the answer is \\boxed{1018}.", 1, 1),
    ("Total 1018 dollars.", 0, 1),  # no box: the last number, soft only
    ("First \\boxed{5}, then \\boxed{1018}", 1, 1),  # several boxes: strict reads the last
    ("\\boxed{17} is wrong, 1018 is right", 0, 0),  # one box: flexible is the box too
    ("\\boxed{$1018.00}", 1, 1),
    ("\\boxed{1.0.18}", 0, 0),  # not a number: counted wrong
    ("no number at all", 0, 0),
    ("\\boxed{5} and \\boxed{x} then 1018", 0, 1),  # a last box without digits: the last number decides
])
def test_dmoe_gsm8k_extraction(text, strict, soft):
    assert dmoe_scoring.gsm8k_results(GSM8K_DOC, [text]) == {"strict_accuracy": strict, "soft_accuracy": soft}


@pytest.mark.parametrize("text,found", [
    ("thinking... \\boxed{B}", ("B", "boxed")),
    ("\\boxed{the option C}", ("C", "boxed")),
    ("Answer: A then answer: **C**", ("C", "answer_tag")),
    ("so the correct answer is d", ("D", "explicit")),
    ("I choose B", ("B", "explicit")),
    ("I think (C) fits", ("C", "pattern")),
    ("between A and B", ("B", "last_letter")),
    ("nothing here", (None, None)),
])
def test_dmoe_arc_extraction_cascade(text, found):
    assert dmoe_scoring.arc_answer(text) == found


def test_dmoe_arc_scores_and_prompt():
    doc = {"question": "Why?", "choices": {"text": ["x", "y", "z"], "label": ["1", "2", "3"]}, "answerKey": "2"}
    assert dmoe_scoring.arc_results(doc, ["\\boxed{B}"]) == {"strict_accuracy": 1, "soft_accuracy": 1}
    assert dmoe_scoring.arc_results(doc, ["maybe (B)"]) == {"strict_accuracy": 0, "soft_accuracy": 1}
    assert dmoe_scoring.arc_results(doc, ["\\boxed{A}"]) == {"strict_accuracy": 0, "soft_accuracy": 0}
    prompt = dmoe_scoring.arc_prompt(doc)
    assert prompt.startswith("Answer the following multiple choice question. Think step by step and then give the "
                             "final answer of the following format: \\boxed{$LETTER} where LETTER is one of ABCD.")
    assert prompt.endswith("Why?\n\nA) x\nB) y\nC) z\nD) NA")
    assert re.fullmatch(r"Please answer the question step by step and put the answer in \\boxed\{\}\. q",
                        dmoe_scoring.gsm8k_prompt({"question": "q"}))
