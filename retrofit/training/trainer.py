"""`retrofit finetune`: brief router fine-tuning with the masked-diffusion objective.

The loop is deliberately plain: deterministic data order derived from the seed and the step (so resuming
needs no sampler state), one noise generator whose state is checkpointed, AdamW with warm-up then cosine or
constant learning rate, gradient accumulation and clipping. Metrics go to ``metrics.jsonl`` beside the
checkpoints, one line per logging step, with routing statistics.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch

from retrofit import distributed
from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.diffusion import add_noise, block_diffusion_layout, diffusion_loss
from retrofit.io.text_data import TokenBatches, build_sequences
from retrofit.io.tokenizer_files import load_tokenizer
from retrofit.models import family_of
from retrofit.precision import resolve_dtype
from retrofit.routers import swap_routers
from retrofit.routers.registry import swap_routers_back
from retrofit.training.logs import HeldoutProbe, JsonlLog
from retrofit.training.checkpoints import checkpoint_dir, latest_checkpoint, load_checkpoint, save_checkpoint
from retrofit.training.export import export_run
from retrofit.training.objective import distillation_kl, load_balancing_loss, router_z_loss
from retrofit.training.preflight import check_recipe
from retrofit.training.recipe import Recipe
from retrofit.training.sharding import whole, whole_optimizer_state, whole_trainable
from retrofit.training.trainable import make_trainable

METRICS_FILE = "metrics.jsonl"


@dataclass
class FinetuneResult:
    output_dir: Path
    steps: int
    losses: list[float]  # diffusion loss of every step run in this invocation
    resumed_at: int | None = None  # the checkpoint's step, when resumed


def lr_lambda(optim):
    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = (step - optim.warmup_steps) / max(1, optim.max_steps - optim.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class Finetune:
    def __init__(self, recipe: Recipe, recipe_dir: Path, recipe_text: str = "", progress=None,
                 resume: bool = False):
        self.recipe, self.recipe_text, self.progress, self.resume = recipe, recipe_text, progress, resume
        self.recipe_dir = recipe_dir
        # Everything that can be known before loading weights, as `retrofit validate` checks it.
        checked = check_recipe(recipe, recipe_dir, resume=resume)
        self.output_dir, self.resume_from, self.source = checked.output_dir, checked.resume_from, checked.source
        self.ckpt = CheckpointDir(self.source.path)
        optim = recipe.optim
        self.join_launch(optim)
        use_bf16 = resolve_dtype(optim.precision, self.device) == torch.bfloat16
        # bf16: frozen weights stay bf16 and the weights that train keep fp32 master copies; on a GPU bf16
        # autocast covers the remaining mixed-dtype ops. On a CPU plain bf16 weights need no autocast.
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if use_bf16 and self.device.type == "cuda" else nullcontext())
        torch.manual_seed(optim.seed)
        dtype = torch.bfloat16 if use_bf16 else torch.float32
        # mode "all" trains every weight: the whole model then needs fp32 masters.
        if recipe.trainable.mode == "all":
            dtype = torch.float32
        model = load_model(self.ckpt, router=recipe.model.router, dtype=dtype, router_dtype=torch.float32,
                           device=distributed.load_device(self.accelerator, self.device),
                           read_weights=distributed.reads_checkpoint(self.accelerator))
        self.base = model
        self.config = model.config
        self.family = family_of(model.config)
        self.data: TokenBatches = build_sequences(recipe.data, recipe_dir, load_tokenizer(self.ckpt.path))
        self.model = make_trainable(model, recipe.trainable)
        if optim.activation_checkpointing:
            model.enable_activation_checkpointing()
        for block in model.moe_blocks():
            block.keep_router_logits = recipe.objective.z_loss > 0 or recipe.objective.balance_loss > 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        # The module the training forward runs through: under a launcher DDP (gradients of the trainable
        # parameters are averaged across ranks; frozen ones have no gradient to sync) or FSDP (every weight is
        # sharded in place, the optimizer then holds the trainable parameters' shards); the model otherwise.
        self.trained = self.model
        if self.world > 1 or self.sharded:  # FSDP with one process too: on a GPU it moves the model there
            self.trained, prepared = self.accelerator.prepare(self.model, self.optimizer)
            self.optimizer = prepared.optimizer  # the plain optimizer: steps are never skipped or scaled
        # The distillation teacher's gates: the checkpoint's, as loaded (or as rank 0 loaded and FSDP broadcast).
        self.teacher_weights = [whole(b.gate.weight.detach()).clone() for b in model.moe_blocks()]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(optim))
        self.noise_gen = torch.Generator().manual_seed(optim.seed + 1)
        self._perm_epoch: int | None = None

    def join_launch(self, optim) -> None:
        """accelerate's view of the launch: one process (no launcher) or one per device (DDP over gloo or NCCL);
        sets the rank, the number of processes, the global batch and the device."""
        from accelerate import Accelerator

        # cpu=True where there is no GPU: accelerate then joins a launched run over gloo (MULTI_CPU) instead of
        # running every rank as a lone process.
        self.accelerator = Accelerator(cpu=optim.device == "cpu" or not torch.cuda.is_available())
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.main = self.accelerator.is_main_process
        self.global_batch = optim.batch_size * optim.grad_accum * self.world
        if optim.global_batch is not None and optim.global_batch != self.global_batch:
            raise RetrofitError(f"optim.global_batch is {optim.global_batch}, but batch_size {optim.batch_size} × "
                                f"grad_accum {optim.grad_accum} × {self.world} process(es) is {self.global_batch}; "
                                "change optim.batch_size or optim.grad_accum (or the number of processes)")
        self.device = self.accelerator.device if optim.device == "auto" else torch.device(optim.device)
        self.sharded = distributed.sharded(self.accelerator)
        if self.sharded:
            self.check_sharding()

    def check_sharding(self) -> None:
        distributed.require_fsdp2(self.accelerator)
        if self.recipe.trainable.mode == "all":
            raise RetrofitError("trainable.mode all is not supported under FSDP (it trains routers and LoRA "
                                "adapters); launch without FSDP, or choose routers or routers+lora")

    # ------------------------------------------------------------------------------------ data

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(self.recipe.optim.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.data), generator=gen), epoch
        return self._perm

    def micro_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of global micro-batch ``index`` (every rank's rows): a seeded permutation per epoch, so the order
        depends only on the step; each rank trains on its own slice of it (:meth:`mine`)."""
        size, total = self.recipe.optim.batch_size * self.world, len(self.data)
        rows = torch.tensor([int(self.permutation(pos // total)[pos % total])
                             for pos in range(index * size, (index + 1) * size)])
        return self.data.input_ids[rows], self.data.prompt_len[rows]

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global micro-batch (all of them in one process)."""
        size = self.recipe.optim.batch_size
        return rows[self.rank * size:(self.rank + 1) * size]

    # ------------------------------------------------------------------------------------ steps

    @contextmanager
    def teacher_routing(self):
        """The original TC model: the family's own token-choice routers with the checkpoint's gate weights,
        adapters off, no stats."""
        blocks = self.base.moe_blocks()
        kept = [b.keep_router_logits for b in blocks]  # the students' logits, which the loss terms read
        for block in blocks:
            block.keep_router_logits = False
        students = swap_routers(self.base, self.family.token_choice(self.config), weights=self.teacher_weights)
        adapters = self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else nullcontext()
        try:
            with adapters, self.base.routing_stats_paused():
                yield
        finally:
            swap_routers_back(self.base, students)
            for block, keep in zip(blocks, kept):
                block.keep_router_logits = keep

    def loss_terms(self, ids: torch.Tensor, prompt_len: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms of this rank's rows. The noise is drawn for the whole global micro-batch on every rank (the
        same generator everywhere), so N processes see exactly the noise one process would, row for row."""
        obj = self.recipe.objective
        noise = add_noise(ids, prompt_len, self.config.mask_token_id, obj.eps, self.noise_gen)
        masked_per_rank = float(noise.masked.sum()) / self.world  # terms averaged over positions use the global count
        noise = type(noise)(*(self.mine(getattr(noise, f)) for f in noise.__dataclass_fields__))
        ids = self.mine(ids)
        noisy, t = noise.noisy.to(self.device), noise.t.to(self.device)
        with self.autocast:
            logits = self.denoise(noisy, t, ids, self.trained)
        terms = {"diffusion": diffusion_loss(logits, ids.to(self.device), noise.to(self.device))}
        router_logits = [b.router_logits for b in self.base.moe_blocks()]
        if obj.z_loss > 0:
            terms["z_loss"] = router_z_loss(router_logits)
        if obj.balance_loss > 0:
            terms["balance"] = load_balancing_loss(
                router_logits, self.config.num_experts_per_tok, self.family.scoring(self.config),
                sum_across_ranks=(lambda t: self.accelerator.reduce(t, "sum")) if self.world > 1 else None,
                world=self.world)
        if obj.distill.weight > 0:
            with torch.no_grad(), self.teacher_routing(), self.autocast:
                teacher = self.denoise(noisy, t, ids, self.model)
            terms["distill"] = distillation_kl(logits, teacher, noise.masked.to(self.device), obj.distill.temperature,
                                               count=masked_per_rank if self.world > 1 else None)
        return terms

    def denoise(self, noisy: torch.Tensor, t: torch.Tensor, clean: torch.Tensor, model) -> torch.Tensor:
        """``model``'s logits on the noisy sequence, laid out as the family is trained: plain masked diffusion,
        or block diffusion (the clean sequence beside it; LLaDA2.0)."""
        block = self.family.training_block
        if block is None:
            return model(input_ids=noisy, mask_ratio=t).logits
        ids, positions, allowed = block_diffusion_layout(noisy, clean, block)
        return model(input_ids=ids, mask_ratio=t, position_ids=positions, allowed_pairs=allowed,
                          logits_to_keep=slice(None, noisy.shape[1])).logits

    def total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        obj = self.recipe.objective
        weights = {"diffusion": 1.0, "z_loss": obj.z_loss, "balance": obj.balance_loss, "distill": obj.distill.weight}
        return sum(weights[k] * v for k, v in terms.items())

    def train_step(self, step: int) -> dict[str, float]:
        optim = self.recipe.optim
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for micro in range(optim.grad_accum):
            last = micro == optim.grad_accum - 1  # DDP averages gradients across ranks once, after the last
            with nullcontext() if last or self.world == 1 else self.accelerator.no_sync(self.trained):
                terms = self.loss_terms(*self.micro_batch(step * optim.grad_accum + micro))
                total = self.total(terms)
                if not self.everywhere_finite(total):
                    path = self.save(step)
                    raise RetrofitError(f"loss is {float(total.detach())} at step {step + 1}; stopped, the last good "
                                        f"state is saved in {path}")
                (total / optim.grad_accum).backward()
            for k, v in self.across_ranks(terms).items():
                sums[k] = sums.get(k, 0.0) + v / optim.grad_accum
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = whole(torch.nn.utils.clip_grad_norm_(params, optim.grad_clip or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        return {**sums, "grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0]}

    # ------------------------------------------------------------------------------------ run

    def everywhere_finite(self, total: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank (all ranks stop together, or none does)."""
        bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0], device=self.device)
        return float(self.accelerator.reduce(bad, "sum")) == 0 if self.world > 1 else not bad.item()

    def across_ranks(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Loss terms averaged over ranks (each rank's are the mean over its equal share of rows): the values
        one process would log for the whole global batch."""
        values = torch.stack([v.detach().float() for v in terms.values()])
        if self.world > 1:
            values = self.accelerator.reduce(values.to(self.device), "mean")
        return dict(zip(terms, values.tolist()))

    def save(self, step: int) -> Path:
        """A checkpoint written once, by rank 0, atomically, of whole tensors (gathered from every rank's shards
        under FSDP; under DDP every rank holds the same)."""
        path = checkpoint_dir(self.output_dir) / f"step-{step:06d}"
        trainable, optimizer_state = whole_trainable(self.model), whole_optimizer_state(self.optimizer)
        if self.main:
            path = save_checkpoint(self.output_dir, step, trainable, optimizer_state, self.scheduler, self.noise_gen,
                                   {"source": str(self.source.path), "global_batch": self.global_batch,
                                    "recipe": self.recipe.model_dump(mode="json")})
        self.accelerator.wait_for_everyone()
        return path

    def run(self) -> FinetuneResult:
        created = not self.output_dir.exists()
        try:
            return self._run()
        except BaseException:
            # A run that failed before its first checkpoint leaves nothing that could pass for a result.
            if created and latest_checkpoint(self.output_dir) is None:
                shutil.rmtree(self.output_dir, ignore_errors=True)
            raise

    def _run(self) -> FinetuneResult:
        optim, every = self.recipe.optim, self.recipe.checkpoint.every
        start = 0
        if self.resume:
            state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler, self.noise_gen)
            start = state["step"]
            saved = state.get("global_batch", self.global_batch)
            if saved != self.global_batch:  # the data order and the noise are laid out per global batch
                raise RetrofitError(f"--resume: the checkpoint was written with a global batch of {saved} (batch_size × "
                                    f"grad_accum × processes), this run has {self.global_batch}; set optim.batch_size "
                                    "or optim.grad_accum so that the product stays the same")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()  # rank 0 may be about to truncate the logs others never open
        metrics = JsonlLog(self.output_dir / METRICS_FILE, keep_until=start) if self.main else None
        heldout = self.heldout_probe(start)
        self.base.enable_routing_stats()
        tokens_per_step = self.global_batch * self.recipe.data.seq_len
        if heldout and start == 0:
            heldout.measure(self.model, self.base, 0, 0)
        losses, window, clock = [], [], time.perf_counter()
        for step in range(start, optim.max_steps):
            values = self.train_step(step)
            losses.append(values["diffusion"])
            window.append(values)
            done = step + 1
            if done % self.recipe.logging.every == 0 or done == optim.max_steps:
                # Loss terms are means over the logging window: one step's loss swings with its sampled t.
                means = {k: sum(v[k] for v in window) / len(window) for k in window[0] if k not in ("lr",)}
                elapsed = time.perf_counter() - clock
                routing = self.routing_across_ranks()
                if metrics:
                    metrics.write({"step": done, **means, "lr": values["lr"], "tokens": done * tokens_per_step,
                                   "global_batch": self.global_batch,
                                   "tokens_per_s": tokens_per_step * len(window) / max(elapsed, 1e-9),
                                   "routing": routing})
                self.base.enable_routing_stats()
                window, clock = [], time.perf_counter()
            if heldout and heldout.due(done, optim.max_steps):
                began = time.perf_counter()
                values["heldout"] = heldout.measure(self.model, self.base, done, done * tokens_per_step)["loss"]
                clock += time.perf_counter() - began  # tokens/s count training time only
            if self.progress:
                self.progress(done, optim.max_steps, values)
            if done % every == 0 or done == optim.max_steps:
                self.save(done)
        self.export()
        if self.main:
            self.draw_curves()
        self.accelerator.wait_for_everyone()
        return FinetuneResult(self.output_dir, optim.max_steps - start, losses,
                              resumed_at=start if self.resume else None)

    def routing_across_ranks(self) -> dict:
        """The logging window's routing statistics over every rank's rows."""
        stats = self.base.routing_stats()
        if self.world > 1:
            from accelerate.utils import gather_object

            for other in gather_object([stats])[1:]:
                stats.merge(other)
        return stats.as_dict()

    def heldout_probe(self, start: int) -> HeldoutProbe | None:
        section = self.recipe.heldout
        if section is None:
            return None
        return HeldoutProbe(section, self.recipe_dir, load_tokenizer(self.ckpt.path), self.config.mask_token_id,
                            self.output_dir, keep_until=start, write=self.main)

    def draw_curves(self) -> None:
        """``curves.png`` beside metrics.jsonl (loss terms, learning rate, tokens/s against steps)."""
        from retrofit.training.curves import training_curves

        lines = (self.output_dir / METRICS_FILE).read_text().splitlines()
        if lines:
            training_curves([json.loads(line) for line in lines], self.output_dir)

    def export(self) -> None:
        export_run(self.base, self.model, self.ckpt, self.source, self.recipe, self.recipe_text, self.output_dir,
                   self.main)
