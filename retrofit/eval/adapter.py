"""lm-evaluation-harness adapter: any model directory retrofit can load, registered as ``retrofit``.

``lm_eval --model retrofit --model_args pretrained=DIR,mc_num=128,router=ec,capacity_factor=1.5`` (through
``retrofit-lm-eval``, see lm_eval_cli.py) and ``retrofit eval`` use this same class.
"""

from __future__ import annotations

import functools
from functools import partial
from collections import defaultdict
from dataclasses import dataclass

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from rich.progress import Progress

from retrofit import distributed
from retrofit.errors import RetrofitError, at_least_one, warn
from retrofit.eval.likelihood import (ScoreJob, greedy_row, mc_estimate, mc_rows, request_seed, score_jobs,
                                      single_token_row)
from retrofit.eval.sampler_llada import apply_stop
from retrofit.eval.sharded import shard_for_eval
from retrofit.eval.sampler_base import Sampler
from retrofit.eval.samplers import make_sampler, sampler_flags
from retrofit.flags import as_bool
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import check_router_fits, checkpoint_config, load_model
from retrofit.io.tokenizer_files import load_tokenizer, require_chat_template
from retrofit.models import family_of
from retrofit.precision import resolve_dtype
from retrofit.sources import resolve_source
from retrofit.progress import PlainProgress
from retrofit.routers import RouterSettings, router_settings
from retrofit.routers.flags import router_flags, settings_from_flags
from retrofit.routers.stats import MASK_RATIOS

# Arguments lm-eval passes to every model besides the user's model_args.
_LM_EVAL_EXTRAS = {"trust_remote_code", "parallelize", "max_batch_size"}


def split_options(fields: dict) -> tuple[dict, dict]:
    """The sampler options and the router settings among the keyword arguments (lm-eval's ``model_args`` too,
    strings there; typed by their flags); anything else is named with the closest valid name, so a misspelt
    setting is never ignored."""
    import difflib
    import inspect

    samplers, routers = {f.dest: f for f in sampler_flags()}, {f.dest: f for f in router_flags()}
    for name in fields:
        if name not in samplers and name not in routers:
            own = [p for p in inspect.signature(RetrofitLM.__init__).parameters if p not in ("self", "options")]
            close = difflib.get_close_matches(name, [*own, *samplers, *routers], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise RetrofitError(f"unknown model_args {name!r}; {hint}valid: {', '.join(own)}, the sampler options "
                                f"{', '.join(samplers)} and the router settings {', '.join(routers)}")
    return ({k: v for k, v in fields.items() if k in samplers},
            {k: routers[k].typed(v) for k, v in fields.items() if k in routers})


def check_blocks(router: RouterSettings, sampler_block: int) -> None:
    """Block routing aligns its blocks with the denoising blocks; a routing block can then only straddle two
    denoising blocks when the sampler's block is not a multiple of the router's. Say so, once."""
    if getattr(router, "block_length", None) and sampler_block % router.block_length:
        warn(f"sampler block length {sampler_block} is not a multiple of the router's block length "
             f"{router.block_length}: some routing blocks straddle two denoising blocks")


def _request_method(method):
    """An lm-eval request method that computes each request once and, under FSDP, then joins the other ranks'
    forwards until every rank has finished its share (:class:`~retrofit.eval.sharded.LockstepModel`).

    With several processes lm-eval pads the shorter shares with copies of their last request (the same object)
    so that every rank gets as many; computed again, they would count twice in the routing statistics. Results
    are deterministic per request (seeded by its prompt), so a copy's result is the original's."""
    @functools.wraps(method)
    def run(self, requests, *args, **kwargs):
        first: dict[int, int] = {}
        where = [first.setdefault(id(req), len(first)) for req in requests]
        unique = list({id(req): req for req in requests}.values())
        results = method(self, unique, *args, **kwargs)
        if self.sharded:
            self.model.finish()
        return [results[i] for i in where]

    return run


@dataclass
class RunSettings:
    """What an evaluation runs with, resolved and checked before any weight is read: the checkpoint, its
    config, the sampler and the router settings."""

    ckpt: CheckpointDir
    config: object
    sampler: Sampler
    router: RouterSettings


def resolve_run(pretrained, router: str | RouterSettings | None, options: dict,
                sampler: str | None = None) -> RunSettings:
    """The model's source, config.json, sampler and router from the user's options (``options``: sampler options
    and router settings, as :func:`split_options` takes them; ``sampler``: another of the family's samplers);
    every check that needs no weights, in one line each. ``retrofit eval`` calls it before counting the run,
    :class:`RetrofitLM` before loading."""
    source = resolve_source(str(pretrained), flag="--model")
    ckpt = CheckpointDir(source.path)
    config = checkpoint_config(ckpt)
    sampler_options, given = split_options(options)
    family = family_of(config)
    kind = family.sampler_for(sampler, ckpt.config.get("sampler"), source.origin)
    sampler = make_sampler(kind, sampler_options, (family.sampler, *family.alternative_samplers))
    if sampler.gen_length >= config.max_position_embeddings:
        raise RetrofitError(f"--gen-length {sampler.gen_length} leaves no room for a prompt in the model's "
                            f"{config.max_position_embeddings} positions; generate fewer tokens")
    base = config.router_settings
    trained_with = family_of(config).hub_routers.get(source.origin)
    if trained_with is not None and base.type == "tc" and "router" not in ckpt.config:  # dmoe-16b's own
        base = router_settings(trained_with)
    if isinstance(router, RouterSettings):  # already built (retrofit inspect's subjects)
        chosen = settings_from_flags(None, given, router) or router
    else:
        chosen = settings_from_flags(router, given, base) or base
    check_router_fits(config, chosen)
    check_blocks(chosen, sampler.denoise_block)
    return RunSettings(ckpt, config, sampler, chosen)


@register_model("retrofit")
class RetrofitLM(LM):
    def __init__(self, pretrained: str, mc_num: int = 128, batch_size: int | str = 8, seed: int = 1234,
                 router: str | RouterSettings | None = None, max_length: int = 4096, device: str | None = None,
                 dtype: str = "auto", progress: bool = True, sampler: str | None = None, **options):
        """``options``: the sampler's options (``gen_length``, ``steps``, ``denoise_block``, ... as ``retrofit eval``
        names its flags, ``retrofit.eval.samplers``) and the router settings (``capacity_factor``,
        ``block_length``, ``guard_size``, ...), which override the checkpoint's; ``router`` switches router,
        ``sampler`` sampler (one of the model family's)."""
        super().__init__()
        self.accelerator = None
        if distributed.launched():  # lm-eval's data-parallel path: requests split by rank, results gathered
            from accelerate import Accelerator

            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())  # gloo on CPUs, NCCL on GPUs
            self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
            device = device or str(self.accelerator.device)
        self.sharded = distributed.sharded(self.accelerator)
        at_least_one(mc_num=mc_num, batch_size=None if batch_size == "auto" else batch_size)
        run = resolve_run(pretrained, router, {k: v for k, v in options.items() if k not in _LM_EVAL_EXTRAS},
                          sampler)
        self.path, self.sampler, self.router = run.ckpt.path, run.sampler, run.router
        ckpt = run.ckpt
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"  # lm_eval's CLI asks for cuda by default
        self.device_ = torch.device(device)
        self.model = load_model(ckpt, router=self.router, dtype=resolve_dtype(dtype, self.device_),
                                device=distributed.load_device(self.accelerator, self.device_),
                                read_weights=distributed.reads_checkpoint(self.accelerator))
        if self.sharded:
            self.model = shard_for_eval(self.accelerator, self.model)
        # Split by mask ratio too, for the routing figures `retrofit eval` draws beside its scores.
        self.model.enable_routing_stats(block_length=self.sampler.denoise_block, mask_ratios=MASK_RATIOS)
        self.tokenizer = load_tokenizer(ckpt.path)
        self.tokenizer.model_max_length = 2**62  # contexts are cut to the model's length below, not by the tokenizer
        self.mask_id = self.model.config.mask_token_id
        self.eos_id = self.tokenizer.eos_token_id
        # The model's own length, not a fixed 4096: longer contexts keep their last tokens.
        max_length = min(int(max_length), self.model.config.max_position_embeddings)
        self.mc_num, self.seed, self.max_length = int(mc_num), int(seed), max_length
        self.batch_size_ = 8 if batch_size == "auto" else int(batch_size)  # lm-eval's "auto": the default
        self.show_progress = as_bool(progress) and self.rank == 0
        # A templated prompt holds its own special tokens; the tokenizer must not add more (as lm-eval's HFLM).
        self.add_special_tokens = True

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=self.add_special_tokens)["input_ids"]

    # ------------------------------------------------------------------------------ helpers

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Tokens of context and continuation; trailing spaces of the context move to the continuation."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self._encode(context + continuation)
        ctx = self._encode(context) if context else []
        if whole[: len(ctx)] != ctx:  # the tokeniser merged across the boundary: encode separately
            whole = ctx + self._encode(continuation)
        ctx, cont = whole[: len(ctx)], whole[len(ctx):]
        keep = self.max_length - len(cont)
        return (ctx[-keep:] if keep > 0 else []), cont[-self.max_length:]

    def _progress(self, total: int, what: str):
        progress = Progress(disable=not self.show_progress, transient=True)
        task = progress.add_task(what, total=total)
        if not self.show_progress:
            return progress, lambda: progress.advance(task)
        plain = PlainProgress(progress.console, what, total)  # lines in a log, where the bar shows nothing

        def advance():
            progress.advance(task)
            plain.update(int(progress.tasks[0].completed))

        return progress, advance

    # ------------------------------------------------------------------------------ lm-eval API

    @_request_method
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        encoded = [self.encode_pair(*req.args) for req in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        shared = defaultdict(list)  # one-token continuations with the same context share one row
        for i, (ctx, cont) in enumerate(encoded):
            if len(cont) == 1 and ctx:
                shared[tuple(ctx)].append(i)
        single = {indices[0]: indices for indices in shared.values()}
        alone = [i for i, (ctx, cont) in enumerate(encoded) if not (len(cont) == 1 and ctx)]

        def jobs():
            # Longest first: the rows sharing a forward are of similar lengths, so little of it is padding.
            for i in sorted([*single, *alone], key=lambda i: -sum(map(len, encoded[i]))):
                ctx, cont = encoded[i]
                if i in single:
                    indices = single[i]
                    yield ScoreJob([single_token_row(ctx, [encoded[j][1][0] for j in indices], self.mask_id)],
                                   partial(self._single_results, results, indices, encoded), len(indices))
                else:
                    rows = mc_rows(ctx, cont, self.mask_id, self.mc_num, self.seed)
                    yield ScoreJob([*rows, greedy_row(ctx, cont, self.mask_id)],
                                   partial(self._mc_result, results, i))

        progress, advance = self._progress(len(requests), "loglikelihood")
        with progress:
            score_jobs(self.model, jobs(), self.batch_size_, self.mask_id, self.device_, advance)
        return results

    @staticmethod
    def _single_results(results: list, indices: list[int], encoded: list, values: list[torch.Tensor]) -> None:
        *logprobs, best = values[0].tolist()
        for i, logprob in zip(indices, logprobs):
            results[i] = (logprob, encoded[i][1][0] == int(best))

    @staticmethod
    def _mc_result(results: list, i: int, values: list[torch.Tensor]) -> None:
        *samples, greedy = values
        results[i] = (mc_estimate(samples), bool(greedy.item()))

    @_request_method
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        out = [0.0] * len(requests)

        def add(i: int, values: list[torch.Tensor]) -> None:
            out[i] += mc_estimate(values)

        def jobs():
            for i, req in enumerate(requests):
                tokens = self._encode(req.args[0])
                for start in range(0, len(tokens), self.max_length):  # independent windows, no context carried
                    window = tokens[start:start + self.max_length]
                    yield ScoreJob(mc_rows([], window, self.mask_id, self.mc_num, self.seed), partial(add, i), 0)

        score_jobs(self.model, jobs(), self.batch_size_, self.mask_id, self.device_)
        return out

    @_request_method
    def generate_until(self, requests, disable_tqdm: bool = False):
        prompts = [self._encode(req.args[0])[-(self.max_length - self.sampler.gen_length):]
                   for req in requests]
        results: list[str | None] = [None] * len(requests)
        # Longest first (a batch that does not fit fails at once, as in lm-eval), and neighbours of similar
        # length share a batch, so little of it is padding. Each row is seeded by its own prompt: its output
        # depends neither on its batch nor on the order of the requests.
        order = sorted(range(len(requests)), key=lambda i: -len(prompts[i]))
        progress, advance = self._progress(len(requests), "generate")
        with progress:
            for start in range(0, len(order), self.batch_size_):
                chunk = order[start:start + self.batch_size_]
                # On the model's device: a sampler's draws then never copy probabilities to the host.
                generators = [torch.Generator(device=self.device_).manual_seed(request_seed(self.seed, prompts[i]))
                              for i in chunk]
                out = self.sampler.generate(self.model, [prompts[i] for i in chunk], self.mask_id, self.eos_id,
                                            generators, self.device_).tolist()
                for row, i in enumerate(chunk):
                    text = self.tokenizer.decode(out[row], skip_special_tokens=True)
                    until = requests[i].args[1].get("until") or []
                    results[i] = apply_stop(text, [until] if isinstance(until, str) else list(until))
                    advance()
        return results

    # ------------------------------------------------------------------------------ chat templates

    @property
    def tokenizer_name(self) -> str:
        """Names the template in lm-eval's request cache (one per checkpoint directory)."""
        return str(self.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The checkpoint's chat template (its tokenizer files'); ``chat_template`` may name one of several."""
        if not chat_template:
            return None
        require_chat_template(self.path)
        template = self.tokenizer.chat_template
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise RetrofitError(f"{self.path} has chat templates {', '.join(sorted(template))}, none named "
                                    f"{name!r}; name one of them")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """A conversation as the checkpoint's template writes it; without a generation prompt the last (assistant)
        message is left open, so a likelihood continuation follows it directly."""
        require_chat_template(self.path)
        self.add_special_tokens = False
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ------------------------------------------------------------------------------ reporting

    def routing_report(self) -> dict:
        return self.model.routing_stats().as_dict()

    # ------------------------------------------------------------------------------ several processes

    @property
    def device(self) -> torch.device:
        return self.device_

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.world_size > 1 else tensor

    def gather_object(self, obj, dst: int = 0):
        if self.world_size <= 1:
            return [obj]
        gathered = [None] * self.world_size if self.rank == dst else None
        torch.distributed.gather_object(obj=obj, object_gather_list=gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            self.accelerator.wait_for_everyone()

    def gather_routing(self) -> None:
        """Every rank's routing statistics merged into rank 0's (a collective: all ranks call it), so the record
        and the figures count every request, as one process would."""
        if self.world_size <= 1:
            return
        gathered = self.gather_object([block.stats for block in self.model.moe_blocks()])
        if self.rank == 0:
            for others in gathered[1:]:
                for block, theirs in zip(self.model.moe_blocks(), others):
                    block.stats.merge(theirs)
