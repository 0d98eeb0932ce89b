"""`retrofit convert`: replace the routers of a checkpoint and write a complete model directory.

Only router tensors can change, and a router swap keeps the checkpoint's gate weights, so the work is done on
files, never on a whole model in memory: the shards are hard links to the source's (copies across file
systems); a router whose tensors do differ has its shard copied and patched (io/model_dir.py). Everything goes
into a temporary directory that becomes the output only after the result has been checked against the source:
linked shards by identity, the logits by one streamed forward that reads each layer once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from retrofit import __version__
from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import check_router_fits, check_weights_fit, checkpoint_config, has_adapter
from retrofit.io.model_card import model_card as card
from retrofit.io.tokenizer_files import require_tokenizer
from retrofit.io.model_dir import ROUTER_FILE, WrittenShards, write_model_directory
from retrofit.io.writer import atomic_directory, check_destination
from retrofit.models import ModelFamily, family_of
from retrofit.routers import RouterSettings, build_router
from retrofit.sources import Source
from retrofit.verify import compare_tensors, probe_input, streamed_logits_many


@dataclass
class RouterSwap:
    layer: int
    name: str
    shard: str
    shape: tuple[int, ...]
    dtype: str


@dataclass
class ConversionPlan:
    source: Source
    config: object  # the family's config class
    target: RouterSettings
    swaps: list[RouterSwap]
    out: Path
    sampler: str  # what the output generates with (recorded in its config.json where not the family's default)

    @property
    def family(self) -> ModelFamily:
        return family_of(self.config)


@dataclass
class ConversionReport:
    out: Path
    shards: WrittenShards
    tensors_checked: int
    logits_identical: bool | None
    max_logit_diff: float


def default_out(source: Source, target: RouterSettings) -> Path:
    return Path("out") / f"{source.name}-{target.type}"


def plan_conversion(source: Source, target: RouterSettings, out: Path | None = None,
                    sampler: str | None = None) -> ConversionPlan:
    """Validate the source and list the routers that would be replaced; writes nothing."""
    ckpt = CheckpointDir(source.path)
    if has_adapter(ckpt.path):  # convert copies the shards; a LoRA adapter beside them would be left behind
        raise RetrofitError(f"{ckpt.path} holds a LoRA adapter (adapter/): convert its base model, or evaluate it "
                            "with --router instead (eval merges the adapter)")
    config = checkpoint_config(ckpt)
    check_weights_fit(ckpt, config)
    require_tokenizer(ckpt.path)  # without it the output could not be evaluated or fine-tuned
    check_router_fits(config, target)
    family = family_of(config)
    swaps = []
    for layer in family.moe_layers(config):
        name = family.router_tensor_name(layer)
        if name not in ckpt.weight_map:
            raise RetrofitError(f"checkpoint at {ckpt.path} has no router tensor {name}")
        dtype, shape = ckpt.tensor_info(name)
        swaps.append(RouterSwap(layer, name, ckpt.weight_map[name], shape, dtype))
    sampler = family.sampler_for(sampler, ckpt.config.get("sampler"), source.origin)
    return ConversionPlan(source, config, target, swaps, Path(out) if out else default_out(source, target), sampler)


def _router(config, settings: RouterSettings):
    return build_router(settings, config.hidden_size, config.num_experts, config.num_experts_per_tok,
                        family_of(config).scoring(config))


def new_router_tensors(ckpt: CheckpointDir, plan: ConversionPlan) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Each layer's new router, holding the checkpoint's router tensors (its gate weight, and an expert bias
    where the family has one), as Hub-named tensors, and the names of those that differ from the checkpoint's
    (usually none: a router swap keeps the router's tensors)."""
    prefixes = [s.name.removesuffix("weight") for s in plan.swaps]  # "model.layers.3.mlp.gate."
    source = ckpt.read([n for n in ckpt.weight_map if n.startswith(tuple(prefixes))])
    out, changed = {}, set()
    for prefix in prefixes:
        own = {n.removeprefix(prefix): t for n, t in source.items() if n.startswith(prefix)}
        router = _router(plan.config, plan.target)
        router.load_state_dict(own, strict=False, assign=True)  # keeps the stored tensors and their dtype
        for key, tensor in router.state_dict().items():
            out[prefix + key] = tensor.detach()
            if prefix + key not in source or not torch.equal(tensor, source[prefix + key]):
                changed.add(prefix + key)
    return out, changed


def convert(plan: ConversionPlan, force: bool = False, command: str = "", verify: bool = True,
            step: Callable[[str], None] = lambda msg: None) -> ConversionReport:
    ckpt = CheckpointDir(plan.source.path)
    check_destination(plan.out.expanduser().resolve(), force)
    routers, differ = new_router_tensors(ckpt, plan)
    changed = {name: routers[name] for name in differ}  # usually none: then every shard is a hard link
    config = plan.family.converted_config(ckpt.config, plan.config.mask_token_id, plan.target)
    config.pop("sampler", None)
    if plan.sampler != plan.family.sampler:
        config["sampler"] = plan.sampler
    with atomic_directory(plan.out, force=force) as tmp:
        shards = write_model_directory(ckpt, tmp, changed, routers, config, model_card(plan, command), step=step,
                                       link=plan.source.linkable)
        report = ConversionReport(plan.out, shards, 0, None, 0.0)
        if verify:
            step("verify: reading each layer once")
            _verify(ckpt, CheckpointDir(tmp), plan, routers, report)
    return report


def _verify(src: CheckpointDir, out: CheckpointDir, plan: ConversionPlan, routers: dict[str, torch.Tensor],
            report: ConversionReport) -> None:
    """Reload what was written: untouched tensors equal the source's, router tensors equal the new routers',
    and with unchanged routing the logits are bit-identical to the source's."""
    report.tensors_checked = compare_tensors(src, out, skip=set(routers))
    written = out.read(list(routers))
    for name, tensor in routers.items():
        if not torch.equal(written[name], tensor):
            raise RetrofitError(f"verification failed: router tensor {name} was not written as built")
    ids = probe_input(plan.config)
    dtype = next(iter(routers.values())).dtype  # compute as the checkpoint is stored (routers keep its dtype)
    src_logits, out_logits = streamed_logits_many(src, ids, [src, out], dtype=dtype)
    if not torch.isfinite(src_logits).all():
        raise RetrofitError(f"the source checkpoint {src.path} itself produces non-finite logits (its weights hold "
                            "NaN or inf values?); nothing was written")
    if not torch.isfinite(out_logits).all():
        raise RetrofitError("verification failed: the converted model produces non-finite logits")
    report.max_logit_diff = float((src_logits - out_logits).abs().max())
    if plan.target == plan.config.router_settings:
        report.logits_identical = torch.equal(src_logits, out_logits)
        if not report.logits_identical:
            raise RetrofitError(f"verification failed: same routing but logits differ by {report.max_logit_diff:g}")


def model_card(plan: ConversionPlan, command: str) -> str:
    rows = "\n".join(f"| {s.layer} | `{s.name}` | {s.shard} |" for s in plan.swaps)
    body = f"""{plan.family.display_name} checkpoint `{plan.source.origin}` with its token-choice routers replaced by
**{plan.target.describe()}**, written by retrofit {__version__}. Only the routers changed, and they keep the
source's gate weights (the same scores; only who chooses differs): every tensor is byte-identical to the
source, and the shards are hard links to (or copies of) the source's files.

Made with:

```
{command or 'retrofit convert'}
```

Router settings (also in `config.json` under `router`):

```json
{plan.target.model_dump_json(indent=2)}
```

All router weights are also in `{ROUTER_FILE}`. Load with:

```python
import retrofit, transformers
model = transformers.AutoModel.from_pretrained("{plan.out.name}")
```

| layer | router tensor | shard |
|---|---|---|
{rows}
"""
    tags = [plan.family.name, "mixture-of-experts", "diffusion-language-model", f"{plan.target.type}-routing"]
    return card(plan.out.name, body, base_model=plan.source.origin, tags=tags)
