"""Host synchronisations, counted on a CPU (tests/host_syncs.py): the grouped-GEMM forward of every router and
family reads nothing back; each sampler reads back at most once per denoising step (plus a few per block), and the
likelihood once per batch of forwards (issue 23). The CUDA tests in test_grouped_experts.py check the same on a GPU
with CUDA's own sync detection, backward passes included."""

from __future__ import annotations

import pytest
import torch

from retrofit.eval.likelihood import ScoreJob, mc_rows, score_jobs
from retrofit.eval.samplers import make_sampler
from retrofit.models import FAMILIES
from retrofit.routers import router_settings
from retrofit.tiny import build_tiny_model
from tests.host_syncs import HostSyncs

ROUTERS = {"tc": {}, "block": {"guard_size": 4, "block_length": 4}, "ec": {}}
PROMPT_LENGTHS = (9, 5, 7)


def _model(family: str, kind: str = "tc"):
    return build_tiny_model(seed=1, router=router_settings(type=kind, **ROUTERS[kind]), family=FAMILIES[family]).eval()


def test_the_counter_tells_device_reads_from_host_reads():
    device = torch.arange(6)  # made "on the device": a tensor that exists before counting
    with HostSyncs() as syncs:
        host = torch.tensor([1, 2, 3])  # made on the host
        assert host.tolist() == [1, 2, 3] and int(host[0]) == 1 and syncs.seen == []
        counts = (device > 2).sum().cpu()  # brought over: one
        assert int(counts) == 3 and (counts + host).tolist() == [4, 5, 6]  # host values since: free
        assert len(syncs.seen) == 1 and syncs.seen[0].startswith("cpu")
        sent = host.to(device.device)
        assert not syncs.is_host(sent) and bool((sent == 1).any())  # sent to the device, then read: two
        _ = device[device > 3]  # a boolean-mask index: three
    assert [s.split()[0] for s in syncs.seen] == ["cpu", "__bool__", "boolean-mask"]


@pytest.mark.parametrize("kind", sorted(ROUTERS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_grouped_forward_reads_nothing_back(family, kind):
    model = _model(family, kind)
    for block in model.moe_blocks():
        block.experts.kernel = "grouped" if kind != "ec" else block.experts.kernel  # EC: equal groups, batched
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad(), HostSyncs() as syncs:
        model(ids)
    assert syncs.seen == []


def test_the_per_expert_loop_is_what_reads_back():
    """The counter sees the CPU's default kernel read each expert's token count (why the GPU takes grouped)."""
    model = _model("llada-moe")
    for block in model.moe_blocks():
        block.experts.kernel = "loop"
    with torch.no_grad(), HostSyncs() as syncs:
        model(torch.randint(0, 300, (1, 16)))
    assert any(s.startswith("tolist at moe.py") for s in syncs.seen)


SAMPLERS = {  # family, sampler options, blocks a row can denoise (LLaDA2.x: the block holding the prompt's end too)
    "llada": ("llada-moe", {"gen_length": 16, "denoise_block": 8, "steps": 8}, 2),
    "llada dual cache, expert choice": ("llada-moe", {"gen_length": 16, "denoise_block": 8, "steps": 8,
                                                      "cache": "dual"}, 2),
    "llada threshold": ("llada-moe", {"gen_length": 16, "denoise_block": 8, "threshold": 0.5}, 2),
    "llada dual cache": ("llada-moe", {"gen_length": 16, "denoise_block": 8, "threshold": 0.5, "cache": "dual"}, 2),
    "llada2 early stop": ("llada2", {"gen_length": 16, "denoise_block": 4, "steps": 4, "threshold": 0.5,
                                     "early_stop": True}, 5),
    "llada2 prefix cache": ("llada2", {"gen_length": 16, "denoise_block": 4, "steps": 4, "cache": "prefix"}, 5),
    "llada2.1 early stop": ("llada2", {"gen_length": 16, "denoise_block": 4, "threshold": 0.5, "early_stop": True},
                            5),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sampler_reads_back_once_a_step(name):
    family, options, blocks = SAMPLERS[name]
    model = _model(family, "ec" if name.endswith("expert choice") else "tc")
    sampler = make_sampler(name.split()[0], options)
    prompts = [torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in PROMPT_LENGTHS]
    steps = []
    model.register_forward_pre_hook(lambda *_: steps.append(1))
    with HostSyncs() as syncs, syncs.pause_in(model):
        sampler.generate(model, prompts, model.config.mask_token_id, model.config.eos_token_id)
    # one a step, two a block (masks left at its start, whether it ended a row), two a call (the prompts' layout,
    # the answers)
    assert steps and len(syncs.seen) <= len(steps) + 2 * blocks + 2, syncs.seen


def test_the_likelihood_reads_back_once_a_flush():
    model = _model("llada-moe")
    mask = model.config.mask_token_id
    requests = [([5, 6, 7], [8, 9, 10, 11]), ([1, 2], [3, 4]), ([9] * 7, [12, 13, 14])]
    jobs = [ScoreJob(mc_rows(context, continuation, mask, 8, seed=0), finish=lambda values: None)
            for context, continuation in requests]
    with HostSyncs() as syncs, syncs.pause_in(model):
        score_jobs(model, jobs, batch_size=4, mask_id=mask, device="cpu", rows_per_flush=8)
    flushes = -(-sum(len(job.rows) for job in jobs) // 8)
    assert len(syncs.seen) == flushes, syncs.seen


def test_a_cached_expert_choice_step_reads_nothing_back():
    """Under the key/value cache, expert choice chooses a step's tokens by the refresh's cut-offs: nothing about the
    span (how many tokens each expert takes) is asked of the device."""
    from retrofit.models.kv_cache import BlockCache

    model = _model("llada-moe", "ec")
    ids, cache = torch.randint(0, 250, (2, 24)), BlockCache()
    with torch.no_grad():
        model(ids, kv_cache=cache)  # the refresh
        with HostSyncs() as syncs:
            model(ids, kv_cache=cache, compute=slice(16, 24))
    assert syncs.seen == []
