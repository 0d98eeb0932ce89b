"""Bad inputs refused in one line that names the problem and the fix, by class (issue 22): config.json fields
against their ranges and against the weights, router settings against the model, every numeric option of
evaluation against its range, local task files."""

from __future__ import annotations

import json
import shutil

import pytest

from retrofit.cli import app
from tests.helpers import one_line_error, runner


def _edited(tiny_dir, tmp_path, **fields):
    """A copy of the tiny snapshot whose config.json has ``fields`` changed."""
    copy = tmp_path / "edited"
    shutil.copytree(tiny_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(fields)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _convert(src, tmp_path, *extra, router="ec"):
    return runner.invoke(app, ["convert", "--src", str(src), "--router", router, "--out", str(tmp_path / "out"),
                               *extra])


@pytest.mark.parametrize("fields, expected", [
    ({"num_experts_per_tok": 12}, "num_experts_per_tok is 12 but there are only 8 experts"),
    ({"num_experts": 0}, "num_experts is 0; it must be a whole number of at least 1"),
    ({"hidden_size": -4}, "hidden_size is -4"),
    ({"num_attention_heads": 2.5}, "num_attention_heads is 2.5"),
    ({"expert_intermediate_size": 0}, "expert_intermediate_size is 0"),
])
def test_config_fields_out_of_range_are_named(tiny_dir, tmp_path, fields, expected):
    line = one_line_error(_convert(_edited(tiny_dir, tmp_path, **fields), tmp_path))
    assert "invalid config.json" in line and expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fields, expected", [
    ({"hidden_size": 128}, "(hidden_size is 128 in config.json but the weights say 64)"),
    ({"num_experts": 16}, "(num_experts is 16 in config.json but the weights say 8)"),
    ({"num_experts": 4, "num_experts_per_tok": 2}, "num_experts is 4 in config.json but the weights say 8"),
    ({"expert_intermediate_size": 48}, "(expert_intermediate_size is 48 in config.json but the weights say 32)"),
    ({"vocab_size": 400}, "(vocab_size is 400 in config.json but the weights say 320)"),
    ({"num_hidden_layers": 3, "moe_layer_freq": [1, 1, 1]}, "the model it describes needs model.layers.2"),
    ({"num_hidden_layers": 1, "moe_layer_freq": [1]}, "holds model.layers.1."),
])
def test_config_that_disagrees_with_the_weights_is_named_before_anything_runs(tiny_dir, tmp_path, fields, expected):
    edited = _edited(tiny_dir, tmp_path, **fields)
    line = one_line_error(_convert(edited, tmp_path))
    assert "config.json does not match the weights" in line and expected in line, line


def test_every_command_that_loads_a_model_checks_its_config_against_the_weights(tiny_dir, tmp_path):
    from retrofit.errors import RetrofitError
    from retrofit.io.load import load_model

    edited = _edited(tiny_dir, tmp_path, hidden_size=128)
    with pytest.raises(RetrofitError, match="config.json does not match the weights"):
        load_model(edited, check_memory=False)
    from retrofit.eval.adapter import RetrofitLM

    with pytest.raises(RetrofitError, match="config.json does not match the weights"):
        RetrofitLM(str(edited), progress=False)  # what `retrofit eval` builds


def test_block_routing_that_keeps_every_expert_is_refused(tiny_dir, tmp_path):
    line = one_line_error(_convert(tiny_dir, tmp_path, router="block"))  # default guard 16 >= 8 experts
    assert "guard_size (16) keeps all 8 experts" in line and "routes exactly like token choice" in line
    assert _convert(tiny_dir, tmp_path, "--guard-size", "2", router="block").exit_code == 0
    from retrofit.errors import RetrofitError
    from retrofit.eval.adapter import RetrofitLM

    with pytest.raises(RetrofitError, match=r"guard_size \(16\) keeps all 8 experts"):
        RetrofitLM(str(tiny_dir), router="block", progress=False)  # what `retrofit eval --router block` builds


def test_an_ec_schedule_past_the_models_experts_is_refused(tiny_dir, tmp_path):
    line = one_line_error(_convert(tiny_dir, tmp_path, "--schedule", "linear", "--k-max", "50"))
    assert "k_max (50) exceeds this model's 8 experts" in line


@pytest.mark.parametrize("flag, value, expected", [
    ("--gen-length", "0", "--gen-length 0: input should be greater than or equal to 1"),
    ("--steps", "0", "--steps 0: input should be greater than or equal to 1"),
    ("--denoise-block", "0", "--denoise-block 0: input should be greater than or equal to 1"),
    ("--batch-size", "0", "--batch-size 0: must be"),
    ("--mc-num", "0", "--mc-num 0: must be"),
    ("--temperature", "-1", "--temperature -1.0: input should be greater than or equal to 0"),
    ("--num-fewshot", "-1", "--num-fewshot -1: must be 0 or more"),
])
def test_evaluation_numbers_out_of_range_are_refused(tiny_dir, tmp_path, flag, value, expected):
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--limit", "1",
                                              flag, value, "--output", str(tmp_path / "e.json")]))
    assert expected in line


def test_lm_eval_model_args_get_the_same_checks(tiny_dir):
    from retrofit.errors import RetrofitError
    from retrofit.eval.adapter import RetrofitLM

    with pytest.raises(RetrofitError, match="--gen-length 5000 leaves no room for a prompt in the model's 1024"):
        RetrofitLM(str(tiny_dir), gen_length=5000)
    with pytest.raises(RetrofitError, match="--steps 0: input should be greater than or equal to 1"):
        RetrofitLM(str(tiny_dir), steps="0")
    with pytest.raises(RetrofitError, match="--mc-num 0"):
        RetrofitLM(str(tiny_dir), mc_num="0")
    with pytest.raises(RetrofitError, match="--batch-size -2"):
        RetrofitLM(str(tiny_dir), batch_size="-2")
    assert RetrofitLM(str(tiny_dir), batch_size="auto", progress=False).batch_size_ == 8


def test_an_empty_local_test_split_is_named(tiny_dir, tmp_path, shared_data):
    data = tmp_path / "data" / "gsm8k"
    data.mkdir(parents=True)
    shutil.copy(shared_data / "gsm8k" / "train.jsonl", data / "train.jsonl")
    (data / "test.jsonl").write_text("\n")
    line = one_line_error(runner.invoke(app, ["eval", "--model", str(tiny_dir), "--tasks", "gsm8k", "--limit", "1",
                                              "--data-dir", str(tmp_path / "data"),
                                              "--output", str(tmp_path / "e.json")]))
    assert "test.jsonl is empty: the test split of gsm8k needs at least one document" in line


def test_an_unknown_router_key_in_a_recipe_lists_that_routers_keys(tiny_dir, tmp_path):
    from tests.helpers import write_recipe

    path = write_recipe(tmp_path, tiny_dir, model={"router": {"type": "ec", "guard_size": 2}})
    line = one_line_error(runner.invoke(app, ["validate", str(path)]))
    assert "unknown key model.router.guard_size; the ec router's keys are type, capacity_factor" in line


# ------------------------------------------------------------------------------------- validate = finetune's checks


def _validate(path, *extra):
    return runner.invoke(app, ["validate", str(path), *extra])


def test_validate_refuses_what_finetune_would_refuse(tiny_dir, tmp_path):
    from tests.helpers import write_recipe

    path = write_recipe(tmp_path, tiny_dir)
    assert _validate(path).exit_code == 0
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"question": "caf\xe9"}\n')
    cases = {
        f"data.path={latin}": "latin.jsonl:1: not UTF-8 text (byte 0xe9 at column 18)",
        "data.seq_len=4096": "data.seq_len 4096 exceeds the model's max_position_embeddings (1024)",
        "model.source=no-such-model": "unknown model.source 'no-such-model'",
        f"model.source={tmp_path / 'missing'}": "model.source not found",
        "model.router.type=block": "guard_size (16) keeps all 8 experts",
        "trainable.mode=routers+lora": None,
        f"heldout.data.path={latin}": "latin.jsonl:1: not UTF-8",
    }
    for override, expected in cases.items():
        result = _validate(path, override)
        if expected is None:
            assert result.exit_code == 0, result.output
            continue
        assert expected in one_line_error(result), override
        # finetune refuses the same, before loading anything
        assert expected in one_line_error(runner.invoke(app, ["finetune", str(path), override])), override


def test_validate_finds_a_truncated_shard_and_a_config_that_disagrees(tiny_dir, tmp_path):
    from tests.helpers import write_recipe

    shard = sorted(tiny_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    path = write_recipe(tmp_path, tiny_dir)
    assert str(shard) in one_line_error(_validate(path))
    other = _edited(tiny_dir, tmp_path, hidden_size=128)
    assert "config.json does not match the weights" in one_line_error(_validate(path, f"model.source={other}"))


def test_a_lora_target_the_model_lacks_names_the_ones_it_has(tiny_dir, tmp_path):
    from tests.helpers import write_recipe

    path = write_recipe(tmp_path, tiny_dir, trainable={"mode": "routers+lora"})
    override = "trainable.lora.target_modules=[q_prj]"
    for command in ("validate", "finetune"):
        line = one_line_error(runner.invoke(app, [command, str(path), override]))
        assert "q_prj names no linear layer of this model; its linear layers are" in line and "q_proj" in line
        assert "lm_head" in line and "gate" not in line.split("are")[-1]


def test_validate_leaves_a_hub_model_that_is_not_downloaded_to_finetune(tiny_dir, tmp_path):
    from tests.helpers import write_recipe

    path = write_recipe(tmp_path, tiny_dir, model={"source": "someorg/some-model"})
    result = _validate(path)
    assert result.exit_code == 0 and "not downloaded yet" in result.output


# ------------------------------------------------------------------------------------------ create-tiny, convert


@pytest.mark.parametrize("flags, expected", [
    (["--experts", "4", "--top-k", "8"], "--top-k 8 exceeds --experts 4"),
    (["--experts", "0"], "--experts 0: must be a whole number of at least 1"),
    (["--layers", "0"], "--layers 0: must be"),
    (["--shard-kb", "0"], "--shard-kb 0: must be"),
    (["--hidden-size", "30", "--heads", "4"], "--hidden-size 30 is not a multiple of --heads 4"),
])
def test_create_tiny_refuses_shapes_that_cannot_work(tmp_path, flags, expected):
    line = one_line_error(runner.invoke(app, ["create-tiny", str(tmp_path / "t"), *flags]))
    assert expected in line and not (tmp_path / "t").exists()


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe\xfa\n", "bad.jsonl:1: not UTF-8 text"),
    (b"not json\n", "bad.jsonl:1: not valid JSON"),
    (b"", "is empty"),
    (b'{"text": "a"}\n', "has no field question, answer (fields: text); see --text-fields"),
])
def test_create_tiny_tokenizer_data_is_read_like_any_data_file(tmp_path, content, expected):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    line = one_line_error(runner.invoke(app, ["create-tiny", str(tmp_path / "t"), "--tokenizer-data", str(data)]))
    assert expected in line


def test_create_tiny_vocabulary_must_hold_the_byte_alphabet(tmp_path, shared_data):
    line = one_line_error(runner.invoke(app, ["create-tiny", str(tmp_path / "t"), "--tokenizer-data",
                                              str(shared_data / "gsm8k" / "test.jsonl"), "--vocab-size", "100"]))
    assert "--vocab-size 100: must be a whole number of at least 258" in line


def test_a_full_disk_reported_by_a_library_is_one_line(tmp_path, monkeypatch):
    import retrofit.tiny as tiny

    def full(*args, **kwargs):  # what the tokenizers library raises: a bare Exception with the OS message
        raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(tiny, "write_json", full)
    line = one_line_error(runner.invoke(app, ["create-tiny", str(tmp_path / "t")]))
    assert "the disk is full; nothing was kept" in line and not list(tmp_path.iterdir())


def test_convert_refuses_a_source_without_a_tokenizer(tiny_dir, tmp_path):
    config = json.loads((tiny_dir / "config.json").read_text())
    (tiny_dir / "config.json").write_text(json.dumps({**config, "mask_token_id": 257}))
    (tiny_dir / "tokenizer.json").unlink()
    line = one_line_error(_convert(tiny_dir, tmp_path))
    assert "has no tokenizer.json" in line and not (tmp_path / "out").exists()


def test_a_mistyped_local_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out" / "tiny-ec").mkdir(parents=True)
    line = one_line_error(runner.invoke(app, ["convert", "--src", "out/tiny-ecc", "--router", "ec"]))
    assert "--src out/tiny-ecc: no such directory (out/ holds tiny-ec)" in line


@pytest.mark.parametrize("flag", ["--seq-len", "--gen-length", "--steps", "--denoise-block"])
def test_inspect_numbers_out_of_range_are_refused(tmp_path, flag):
    line = one_line_error(runner.invoke(app, ["inspect", flag, "0", "--out", str(tmp_path / "i")]))
    expected = "must be a whole number of at least 1" if flag == "--seq-len" else "input should be greater than"
    assert f"{flag} 0: {expected}" in line


def test_a_failed_hub_fetch_mentions_a_local_directory_only_for_what_could_be_one():
    from retrofit.errors import RetrofitError
    from retrofit.sources import resolve_source

    with pytest.raises(RetrofitError, match="no local directory someorg/some-model either"):
        resolve_source("someorg/some-model")
    with pytest.raises(RetrofitError) as registry_name:
        resolve_source("llada-moe")
    assert "could not fetch inclusionAI/LLaDA-MoE-7B-A1B-Base" in str(registry_name.value)
    assert "local directory" not in str(registry_name.value)
