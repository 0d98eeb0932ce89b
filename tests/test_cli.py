"""The command line through Typer's CliRunner: the happy paths and one-line errors for user mistakes."""

from __future__ import annotations

import json

import pytest
import transformers

import retrofit  # noqa: F401  (registers the model with transformers' Auto classes)
from retrofit.cli import app
from retrofit import sources
from tests.helpers import one_line_error, runner


def run(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture
def created(tmp_path):
    result = run("create-tiny", tmp_path / "t")
    assert result.exit_code == 0, result.output
    return tmp_path / "t"


def test_create_tiny_writes_a_hub_layout(created):
    names = {p.name for p in created.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert len([n for n in names if n.startswith("model-") and n.endswith(".safetensors")]) >= 3
    assert json.loads((created / "config.json").read_text())["model_type"] == "llada"
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(created)
    assert tok.convert_tokens_to_ids("<|mask|>") == 257
    assert tok.decode(tok("12 apples")["input_ids"]) == "12 apples"


def test_convert_then_automodel(created, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("convert", "--src", created, "--router", "ec")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "t-ec"
    assert "verified" in result.output
    model = transformers.AutoModel.from_pretrained(out)
    assert model.config.router_settings.type == "ec"


def test_convert_with_schedule_flags(created, tmp_path):
    result = run("convert", "--src", created, "--router", "ec", "--schedule", "linear-reverse", "--k-min", "1",
                 "--k-max", "3", "--out", tmp_path / "sched")
    assert result.exit_code == 0, result.output
    router = json.loads((tmp_path / "sched" / "config.json").read_text())["router"]
    assert router["schedule"] == {"name": "linear-reverse", "k_min": 1, "k_max": 3, "sigma": 0.22,
                                  "threshold": 0.5}


def test_dry_run_prints_table_and_writes_nothing(created, tmp_path):
    result = run("convert", "--src", created, "--router", "block", "--guard-size", "2", "--out", tmp_path / "x",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    assert "model.layers.1.mlp.gate.weight" in result.output and "block" in result.output
    assert not (tmp_path / "x").exists()


def test_unknown_src_names_the_choices():
    line = one_line_error(run("convert", "--src", "gpt5", "--router", "ec"))
    assert "unknown --src 'gpt5'" in line and "--src PATH" in line


def test_missing_directory():
    line = one_line_error(run("convert", "--src", "./nope/model", "--router", "ec"))
    assert "no such directory" in line


def test_hub_failure_suggests_src_path(monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to the Hub")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    line = one_line_error(run("convert", "--src", "llada-moe", "--router", "ec"))
    assert "inclusionAI/LLaDA-MoE-7B-A1B-Base" in line and "--src PATH" in line


def test_hub_id_goes_through_snapshot_download(monkeypatch, created, tmp_path):
    asked = {}

    def fake(repo_id, **kwargs):
        asked.update(repo_id=repo_id, **kwargs)
        return str(created)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake)
    result = run("convert", "--src", "someone/tiny-llada-moe", "--router", "tc", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert asked["repo_id"] == "someone/tiny-llada-moe"
    assert not any(p.endswith(".py") or p.endswith(".bin") for p in asked["allow_patterns"])


def test_src_tiny_is_the_embedded_model(tmp_path):
    """`--src tiny` converts the pretrained model shipped in the package."""
    result = run("convert", "--src", "tiny", "--router", "ec", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    record = json.loads((sources._embedded_path("tiny") / "training.json").read_text())
    assert record["heldout_masked_token_loss"] < record["unigram_baseline_loss"] - 1.0


def test_corrupt_shard(created, tmp_path):
    shard = sorted(created.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    line = one_line_error(run("convert", "--src", created, "--router", "ec", "--out", tmp_path / "o"))
    assert shard.name in line and "corrupt" in line
    assert not (tmp_path / "o").exists()


def test_unsupported_config_field(created, tmp_path):
    cfg = json.loads((created / "config.json").read_text())
    cfg["num_shared_experts"] = 2
    (created / "config.json").write_text(json.dumps(cfg))
    line = one_line_error(run("convert", "--src", created, "--router", "ec", "--out", tmp_path / "o"))
    assert "num_shared_experts" in line


def test_existing_out_needs_force(created, tmp_path):
    (tmp_path / "o").mkdir()
    line = one_line_error(run("convert", "--src", created, "--router", "ec", "--out", tmp_path / "o"))
    assert "--force" in line
    assert run("convert", "--src", created, "--router", "ec", "--out", tmp_path / "o", "--force").exit_code == 0


@pytest.mark.parametrize("flags, message", [
    (["--router", "ec", "--capacity-factor", "0"], "invalid --capacity-factor: Input should be greater than 0"),
    (["--router", "ec", "--schedule", "cosinus"], "invalid --schedule: Input should be 'constant'"),
    (["--router", "block", "--guard-size", "1"], "guard_size (1) must be at least top_k (2)"),
    (["--router", "ec", "--guard-size", "4"], "--guard-size is a setting of the block router, not of ec"),
    (["--router", "xc"], "unknown --router 'xc'; use tc, ec, block"),
])
def test_bad_router_settings_are_one_line(created, tmp_path, flags, message):
    """Each names the flag the user typed (not the settings' field path) and what is wrong with it."""
    assert message in one_line_error(run("convert", "--src", created, *flags, "--out", tmp_path / "o"))


def test_convert_and_eval_take_the_same_router_flags_with_the_same_help():
    """Both commands' router options come from the routers' settings classes: same names, same help."""
    from retrofit.routers.flags import router_flags

    def router_lines(command: str) -> list[str]:
        text = run(command, "--help").output
        start = text.index("  --capacity-factor")
        return [line for line in text[start:].splitlines() if not line.strip().startswith("--help")]

    assert router_lines("convert") == router_lines("eval")
    text = run("eval", "--help").output
    for flag in router_flags():
        assert flag.flag in text, flag.flag
    assert "--denoise-block" in text and "block: positions per routing block" in text


def test_help_explains_commands():
    result = run("--help")
    assert result.exit_code == 0
    assert "convert" in result.output and "create-tiny" in result.output
    result = run("convert", "--help")
    assert "--capacity-factor" in result.output and "--dry-run" in result.output
    # Defaults named in the help text survive (square brackets would be eaten by rich markup).
    assert "(default: out/<src>-<router>)" in " ".join(result.output.split())
    assert "(default: gen-length)" in " ".join(run("eval", "--help").output.split())


@pytest.mark.parametrize("command", [[], ["convert"], ["create-tiny"], ["finetune"], ["validate"], ["eval"]])
def test_help_reads_at_80_columns(command):
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0
    assert all(len(line) <= 80 for line in result.output.splitlines()), result.output
    assert "<bool>" not in result.output and "…" not in result.output


def test_error_text_is_printed_verbatim():
    result = run("convert", "--src", "./missing[dir]", "--router", "ec")
    assert result.exit_code == 1 and "--src ./missing[dir]: no such directory" in one_line_error(result)


def test_tiny_random_is_generated_once_and_converts(tmp_path):
    result = run("convert", "--src", "tiny-random", "--router", "ec", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    first = sources.resolve_source("tiny-random").path
    stamp = (first / "config.json").stat().st_mtime_ns
    assert sources.resolve_source("tiny-random").path == first
    assert (first / "config.json").stat().st_mtime_ns == stamp, "generated on first use only"
