"""Shared fixtures: tiny models of the real architecture, built in tmp_path; nothing is downloaded. Shared plain
functions live in tests/helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports huggingface_hub, which reads its offline switch once, at import: set later (by the
# fixture below alone), an in-process run still tries the network and waits out its retries.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from retrofit.tiny import build_tiny_model
from tests.helpers import shared_data_dir, tiny_snapshot


@pytest.fixture(scope="session")
def _cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("retrofit-cache")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, _cache):
    # A test must never reach the Hub; make any attempt fail fast instead of hanging on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Generated models (tiny-random) go to a per-session cache, never the user's.
    monkeypatch.setenv("RETROFIT_CACHE", str(_cache))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The benchmark data directory; a test that asks for it fails, naming RETROFIT_SHARED_DATA, when it is missing."""
    return shared_data_dir()


@pytest.fixture
def one_thread():
    """torch on one thread for the test. MKL picks kernels by the machine's load when it has several threads, which
    changes the last bits of matmuls between runs on a busy machine: one thread makes bit-for-bit comparisons of
    two runs meaningful, and keeps a test that checks only structure fast while other work holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model():
    return build_tiny_model(seed=0)


@pytest.fixture
def tiny_dir(tmp_path, tiny_model) -> Path:
    """A Hub-style snapshot of the tiny model, bf16, in several shards."""
    return tiny_snapshot(tmp_path / "tiny-src", tiny_model, max_shard_bytes=64 * 1024)
