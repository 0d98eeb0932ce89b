"""Nothing a user does to an output changes a source (issue 22): the models retrofit ships or generates are never
hard-linked into outputs; a damaged embedded model names how to restore it; leftovers are counted by the bytes
their removal frees."""

from __future__ import annotations

import logging
import os

from retrofit.cli import app
from retrofit.io.checkpoint import CheckpointDir
from retrofit.sources import resolve_source
from tests.helpers import one_line_error, runner


def _inodes(path):
    return {p.name: p.stat().st_ino for p in path.glob("model*.safetensors")}


def test_writing_into_a_converted_tiny_cannot_reach_the_embedded_model(tmp_path):
    embedded = resolve_source("tiny").path
    before = {p.name: p.read_bytes() for p in embedded.glob("*.safetensors")}
    out = tmp_path / "tiny-ec"
    result = runner.invoke(app, ["convert", "--src", "tiny", "--router", "ec", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "0 hard-linked" in result.output and "never hard-linked" in result.output
    assert not set(_inodes(out).values()) & set(_inodes(embedded).values())
    for shard in out.glob("*.safetensors"):  # what the issue did: truncate the output in place
        os.truncate(shard, 1000)
    assert {p.name: p.read_bytes() for p in embedded.glob("*.safetensors")} == before
    again = runner.invoke(app, ["convert", "--src", "tiny", "--router", "tc", "--out", str(tmp_path / "tc")])
    assert again.exit_code == 0, again.output


def test_the_embedded_model_named_by_its_path_is_not_linked_either(tmp_path):
    embedded = resolve_source("tiny").path
    assert not resolve_source(str(embedded)).linkable and not resolve_source("tiny-random").linkable
    out = tmp_path / "x"
    assert runner.invoke(app, ["convert", "--src", str(embedded), "--router", "ec", "--out", str(out)]).exit_code == 0
    assert not set(_inodes(out).values()) & set(_inodes(embedded).values())


def test_a_fine_tuned_tiny_does_not_link_the_embedded_model(tmp_path):
    from tests.helpers import write_recipe

    embedded = resolve_source("tiny").path
    recipe = write_recipe(tmp_path, "tiny", optim={"max_steps": 1})
    result = runner.invoke(app, ["finetune", str(recipe)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "run"
    assert CheckpointDir(out).shards and not set(_inodes(out).values()) & set(_inodes(embedded).values())


def test_user_sources_are_still_hard_linked(tiny_dir, tmp_path):
    out = tmp_path / "ec"
    assert runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--out", str(out)]).exit_code == 0
    assert _inodes(out) == _inodes(tiny_dir)


def test_a_damaged_embedded_model_says_how_to_restore_it(tmp_path, monkeypatch):
    import shutil

    import retrofit.sources as sources

    copy = tmp_path / "assets" / "tiny"
    shutil.copytree(resolve_source("tiny").path, copy)
    os.truncate(copy / "model.safetensors", 1000)
    monkeypatch.setattr(sources, "_embedded_path", lambda name: copy)
    line = one_line_error(runner.invoke(app, ["convert", "--src", "tiny", "--router", "ec",
                                              "--out", str(tmp_path / "o")]))
    assert "is damaged" in line and "git checkout -- retrofit/assets" in line and "download" not in line


def test_leftovers_count_only_the_bytes_their_removal_frees(tiny_dir, tmp_path, caplog):
    stale = tmp_path / ".ec.partial-abc"
    stale.mkdir()
    linked = tmp_path / "source-shard.safetensors"  # sparse files: sizes without disk
    linked.touch()
    os.truncate(linked, 50_000_000)
    os.link(linked, stale / "model.safetensors")  # what a killed convert leaves: a link to a source's shard
    (stale / "own.bin").touch()
    os.truncate(stale / "own.bin", 30_000_000)
    with caplog.at_level(logging.WARNING, logger="retrofit"):
        result = runner.invoke(app, ["convert", "--src", str(tiny_dir), "--router", "ec", "--out",
                                     str(tmp_path / "ec")])
    assert result.exit_code == 0, result.output
    assert any("0.03 GB" in r.getMessage() and ".ec.partial-abc" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
