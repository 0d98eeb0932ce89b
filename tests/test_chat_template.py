"""Chat templates end to end: the families' formats, create-tiny writing them, convert and finetune carrying them
over unchanged, `retrofit eval --apply-chat-template` (and `lm_eval --model retrofit --apply_chat_template`)
sending templated prompts, and the one-line refusals."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from retrofit.cli import app
from retrofit.eval.adapter import RetrofitLM
from retrofit.eval.chat import ChatSettings
from retrofit.errors import RetrofitError
from retrofit.io.tokenizer_files import chat_template, load_tokenizer
from retrofit.models import FAMILIES
from tests.helpers import finetune, one_line_error, runner, shared_data_dir, tiny_snapshot, write_recipe

# inclusionAI/dInfer's benchmarks (benchmarks/benchmark.py @ fce4e32) write LLaDA2.0-mini prompts by hand so:
DINFER_PROMPT = "<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>{}<|role_end|><role>ASSISTANT</role>"


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return tiny_snapshot(tmp_path_factory.mktemp("chat") / "tiny", seed=1)


def render(directory: Path, messages: list[dict], generation_prompt: bool = True) -> str:
    return load_tokenizer(directory).apply_chat_template(messages, tokenize=False,
                                                         add_generation_prompt=generation_prompt,
                                                         continue_final_message=not generation_prompt)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_create_tiny_writes_the_family_format(tmp_path, family):
    path = tiny_snapshot(tmp_path / "tiny", family=FAMILIES[family])
    assert chat_template(path) == FAMILIES[family].chat_template()
    assert render(path, [{"role": "user", "content": "What is 2+3?"}]) == DINFER_PROMPT.format("What is 2+3?")
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q1"},
             {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert render(path, turns) == ("<role>SYSTEM</role>Be brief.\ndetailed thinking off<|role_end|>"
                                   "<role>HUMAN</role>Q1<|role_end|><role>ASSISTANT</role>A1<|role_end|>"
                                   "<role>HUMAN</role>Q2<|role_end|><role>ASSISTANT</role>")
    # A likelihood continuation follows an open assistant turn directly (lm-eval's multiple-choice prompts).
    open_turn = render(path, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "Answer:"}], False)
    assert open_turn.endswith("<role>ASSISTANT</role>Answer:")


def test_full_size_preset_writes_the_template(tmp_path):
    from retrofit.tiny import TINY_DIMS, create_preset

    path = create_preset(tmp_path / "preset", dims={**TINY_DIMS, "vocab_size": 320}, eos_token_id=300,
                         mask_token_id=301, max_shard_bytes=1 << 20)
    assert chat_template(path) == FAMILIES["llada-moe"].chat_template()


def test_convert_and_finetune_carry_the_template_unchanged(tmp_path, snapshot):
    source = tmp_path / "source"
    shutil.copytree(snapshot, source)
    # A template file beside tokenizer_config.json, as newer snapshots keep it, wins and travels as a file.
    (source / "chat_template.jinja").write_text("{{ messages[0].content }}|custom")
    converted = tmp_path / "ec"
    assert runner.invoke(app, ["convert", "--src", str(source), "--router", "ec", "--out", str(converted)]).exit_code == 0
    assert (converted / "chat_template.jinja").read_bytes() == (source / "chat_template.jinja").read_bytes()
    config = json.loads((source / "tokenizer_config.json").read_text())["chat_template"]
    assert json.loads((converted / "tokenizer_config.json").read_text())["chat_template"] == config
    _, result = finetune(write_recipe(tmp_path, converted, optim={"max_steps": 2}, checkpoint={"every": 2}))
    tuned = result.output_dir
    assert chat_template(tuned) == chat_template(source) == "{{ messages[0].content }}|custom"
    assert render(tuned, [{"role": "user", "content": "x"}]) == "x|custom"


def _eval(model: Path, output: Path, *extra: str):
    return runner.invoke(app, ["eval", "--model", str(model), "--tasks", "gsm8k", "--limit", "2", "--num-fewshot", "1",
                               "--data-dir", str(shared_data_dir()), "--gen-length", "8", "--log-samples",
                               "--no-figures", "--output", str(output), *extra])


def _prompts(output: Path) -> list[str]:
    """Each document's prompt (lm-eval logs a document once per filter: GSM8K's strict and flexible)."""
    lines = [json.loads(line) for line in output.with_name(output.stem + "-samples.jsonl").read_text().splitlines()]
    assert {line["filter"] for line in lines} == {"strict-match", "flexible-extract"}
    return list({line["doc_id"]: line["arguments"][0][0] for line in lines}.values())


@pytest.mark.slow
def test_eval_sends_templated_prompts(tmp_path, snapshot):
    plain = tmp_path / "plain.json"
    assert _eval(snapshot, plain).exit_code == 0
    assert all("<role>" not in p and p.startswith("Question:") for p in _prompts(plain))
    chat = tmp_path / "chat.json"
    result = _eval(snapshot, chat, "--apply-chat-template", "--system-instruction", "Solve it.")
    assert result.exit_code == 0, result.output
    prompts = _prompts(chat)
    assert len(prompts) == 2
    for prompt in prompts:
        # One shot as its own turns (lm-eval's default with a template), then the question, then the open turn.
        assert prompt.startswith("<role>SYSTEM</role>Solve it.\ndetailed thinking off<|role_end|><role>HUMAN</role>"
                                 "Question:")
        assert prompt.count("<role>HUMAN</role>") == 2 and prompt.count("<role>ASSISTANT</role>") == 2
        assert prompt.endswith("\nAnswer:<|role_end|><role>ASSISTANT</role>")
    record = json.loads(chat.read_text())
    assert record["settings"]["chat"] == {"apply_chat_template": True, "fewshot_as_multiturn": True,
                                          "system_instruction": "Solve it."}
    single = tmp_path / "single.json"
    assert _eval(snapshot, single, "--apply-chat-template", "--no-fewshot-as-multiturn").exit_code == 0
    assert all(p.count("<role>HUMAN</role>") == 1 for p in _prompts(single))


@pytest.mark.slow
def test_lm_eval_command_line_applies_the_template(tmp_path, snapshot):
    """`--write-tasks` prints the lm_eval line with this run's chat settings, shots, limit and sampler options;
    run as printed, lm-eval sends templated prompts through the adapter."""
    tasks = tmp_path / "tasks"
    result = runner.invoke(app, ["eval", "--tasks", "gsm8k", "--data-dir", str(shared_data_dir()), "--write-tasks",
                                 str(tasks), "--model", str(snapshot), "--apply-chat-template", "--num-fewshot", "1",
                                 "--limit", "1", "--gen-length", "8"])
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split()).split("run: ")[1]
    assert printed.endswith("--num_fewshot 1 --limit 1 --apply_chat_template --fewshot_as_multiturn true")
    assert f"pretrained={snapshot},gen_length=8 " in printed
    command = [str(Path(sys.executable).with_name("lm_eval")), *shlex.split(printed)[1:], "--log_samples",
               "--output_path", str(tmp_path / "out"), "--model_args", f"pretrained={snapshot},gen_length=8,progress=false"]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    [samples] = list((tmp_path / "out").rglob("samples_*.jsonl"))
    prompt = json.loads(samples.read_text().splitlines()[0])["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<role>SYSTEM</role>detailed thinking off<|role_end|><role>HUMAN</role>Question:")
    assert prompt.count("<role>HUMAN</role>") == 2 and prompt.endswith("<role>ASSISTANT</role>")


def test_a_base_model_without_template_is_refused_before_loading(tmp_path, snapshot):
    base = tmp_path / "base"
    shutil.copytree(snapshot, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(base), "--tasks", "gsm8k", "--data-dir",
                                              str(shared_data_dir()), "--apply-chat-template"]))
    assert "has no chat template" in line and "leave out --apply-chat-template" in line
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(snapshot), "--tasks", "gsm8k",
                                              "--fewshot-as-multiturn"]))
    assert "--fewshot-as-multiturn needs --apply-chat-template" in line
    lm = RetrofitLM(str(base), gen_length=8, progress=False)
    with pytest.raises(RetrofitError, match="has no chat template"):
        lm.apply_chat_template([{"role": "user", "content": "x"}])


def test_adapter_template_and_encoding(snapshot):
    lm = RetrofitLM(str(snapshot), gen_length=8, progress=False)
    assert lm.chat_template(False) is None
    assert lm.chat_template(True) == FAMILIES["llada-moe"].chat_template()
    assert lm.tokenizer_name == str(snapshot).replace("/", "__")
    text = lm.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == DINFER_PROMPT.format("Hi")
    # A templated prompt holds its own special tokens: encoding adds none.
    assert lm._encode(text) == lm.tokenizer(text, add_special_tokens=False)["input_ids"]


def test_chat_settings_follow_lm_eval_defaults():
    assert ChatSettings().resolved().fewshot_as_multiturn is False
    assert ChatSettings(apply_chat_template=True).resolved().fewshot_as_multiturn is True
    assert ChatSettings(apply_chat_template=True, fewshot_as_multiturn=False).resolved().fewshot_as_multiturn is False
    with pytest.raises(RetrofitError, match="needs --apply-chat-template"):
        ChatSettings(fewshot_as_multiturn=True).resolved()
