"""Check a written checkpoint against its source without holding either model in memory.

Tensors are compared shard by shard; logits come from a *streamed* forward that loads one decoder layer at a
time into a one-layer shell of the same architecture, so verifying a 7B conversion needs about one layer of
memory (plus embeddings), not two whole models.
"""

from __future__ import annotations

import torch

from retrofit.errors import RetrofitError
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import checkpoint_config
from retrofit.models.llada_moe import LLaDAMoEConfig, LLaDAMoEModelLM, stack_expert_tensors

_OUTER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _one_layer_shell(config: LLaDAMoEConfig) -> LLaDAMoEModelLM:
    fields = config.to_dict()
    fields.update(num_hidden_layers=1, moe_layer_freq=[1])
    shell_config = LLaDAMoEConfig.from_dict({k: v for k, v in fields.items() if k != "model_type"})
    return LLaDAMoEModelLM(shell_config).eval()


def _load_prefixed(module: torch.nn.Module, ckpt: CheckpointDir, prefix: str, num_experts: int, dtype) -> None:
    names = [n for n in ckpt.weight_map if n.startswith(prefix)]
    tensors = stack_expert_tensors(ckpt.read(names), num_experts)
    module.load_state_dict({k.removeprefix(prefix): v.to(dtype) for k, v in tensors.items()}, strict=True)


@torch.no_grad()
def streamed_logits(ckpt: CheckpointDir, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logits of the checkpoint (with its own router settings) on ``input_ids``, one layer in memory."""
    config = checkpoint_config(ckpt)
    shell = _one_layer_shell(config).to(dtype)
    outer = ckpt.read([n for n in _OUTER if n in ckpt.weight_map])
    if config.tie_word_embeddings:
        outer["lm_head.weight"] = outer["model.embed_tokens.weight"]
    shell.load_state_dict({k: v.to(dtype) for k, v in outer.items()}, strict=False)
    x, layer_args = shell.model.prepare(input_ids, attention_mask)
    layer = shell.model.layers[0]
    for i in range(config.num_hidden_layers):
        _load_prefixed(layer, ckpt, f"model.layers.{i}.", config.num_experts, dtype)
        x = layer(x, *layer_args)
    return shell.lm_head(shell.model.norm(x))


def probe_input(config: LLaDAMoEConfig, length: int = 24, seed: int = 0) -> torch.Tensor:
    """A fixed two-sequence input with some mask tokens, so timestep-aware routers see a real mask ratio."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(config.vocab_size, 256), (2, length), generator=gen)
    ids[0, length // 2:] = config.mask_token_id
    ids[1, ::3] = config.mask_token_id
    return ids


def compare_tensors(src: CheckpointDir, out: CheckpointDir, skip: set[str]) -> int:
    """Every tensor of ``src`` not in ``skip`` must be present in ``out`` and equal in dtype and bytes."""
    if set(src.weight_map) != set(out.weight_map):
        diff = sorted(set(src.weight_map) ^ set(out.weight_map))
        raise RetrofitError(f"verification failed: tensor names differ from the source: {diff[:5]}")
    checked = 0
    for shard in src.shards:
        names = [n for n in src.tensors_in(shard) if n not in skip]
        ours = out.read(names)
        for name, theirs in src.read(names).items():
            if ours[name].dtype != theirs.dtype or not torch.equal(ours[name], theirs):
                raise RetrofitError(f"verification failed: {name} differs from the source")
            checked += 1
    return checked
