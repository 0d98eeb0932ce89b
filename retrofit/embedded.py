"""Pack the pretrained tiny model into the package (``--src tiny``) with a record of how good it is.

`make tiny` trains it with the project's own code (recipes/tiny-pretrain.yaml) and then runs
``python -m retrofit.embedded out/tiny-pretrain``: the weights are stored in bf16, the held-out masked-token
loss of exactly what ships is measured on GSM8K test text next to a unigram baseline, and both go into the
model card and ``training.json`` beside the weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from retrofit.errors import RetrofitError
from retrofit.eval.heldout import masked_token_loss, perplexity, text_sequences, unigram_loss
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.io.model_dir import converted_config
from retrofit.io.tokenizer_files import copy_tokenizer_files
from retrofit.io.writer import atomic_directory, save_tensors, write_json
from retrofit.models.llada_moe import hub_state_dict
from retrofit.training.data import load_tokenizer

ASSET = Path(__file__).resolve().parent / "assets" / "tiny"
GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
FIELDS = ["question", "answer"]


def measure(model_dir: Path, data_dir: Path = GSM8K, heldout_examples: int = 400) -> dict:
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    train = text_sequences(tokenizer, data_dir / "train.jsonl", FIELDS)
    heldout = text_sequences(tokenizer, data_dir / "test.jsonl", FIELDS, max_examples=heldout_examples)
    loss = masked_token_loss(model, heldout, model.config.mask_token_id)
    baseline = unigram_loss(train, heldout, model.config.vocab_size)
    return {"heldout_masked_token_loss": loss, "unigram_baseline_loss": baseline,
            "heldout_perplexity": perplexity(loss), "unigram_perplexity": perplexity(baseline),
            "heldout_tokens": int(heldout.numel()), "train_tokens": int(train.numel()),
            "parameters": sum(p.numel() for p in model.parameters())}


def pack(trained: Path, dest: Path = ASSET) -> dict:
    ckpt = CheckpointDir(trained)
    model = load_model(ckpt)
    metrics_file = trained / "metrics.jsonl"
    steps = json.loads(metrics_file.read_text().splitlines()[-1])["step"] if metrics_file.is_file() else None
    with atomic_directory(dest, force=True) as tmp:
        save_tensors(tmp / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in hub_state_dict(model).items()})
        write_json(tmp / "config.json", converted_config(ckpt.config, model.config.mask_token_id,
                                                        model.config.router_settings) | {"torch_dtype": "bfloat16"})
        copy_tokenizer_files(ckpt.path, tmp)
        record = measure(tmp)  # measured on exactly what ships (bf16 weights)
        record.update(steps=steps, recipe="recipes/tiny-pretrain.yaml", data="GSM8K train (question + answer)",
                      heldout="GSM8K test, first 400 examples")
        write_json(tmp / "training.json", record)
        (tmp / "README.md").write_text(card(record, model.config))
    return record


def card(record: dict, config) -> str:
    return f"""# retrofit tiny (embedded default model)

A tiny LLaDA-MoE-architecture masked diffusion model ({record['parameters']:,} parameters:
{config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_experts} experts top-{config.num_experts_per_tok},
expert size {config.expert_intermediate_size}, vocabulary {config.vocab_size}), token-choice routing, trained from
scratch by retrofit itself: `make tiny` (BPE tokenizer trained on GSM8K train text with `tokenizers`, then
`retrofit finetune recipes/tiny-pretrain.yaml`: all parameters, load-balancing loss, masked-diffusion
objective, {record['steps']} steps of 32 x 128 tokens). Stored in bf16.

| held-out text (GSM8K test) | nats/token | perplexity |
|---|---|---|
| this model, masked-token loss | {record['heldout_masked_token_loss']:.3f} | {record['heldout_perplexity']:.1f} |
| unigram baseline | {record['unigram_baseline_loss']:.3f} | {record['unigram_perplexity']:.1f} |

It exists to show every retrofit command working offline on a CPU; it knows GSM8K-style text and nothing else.
"""


def main(argv: list[str]) -> None:
    if len(argv) != 1:
        raise SystemExit("usage: python -m retrofit.embedded TRAINED_MODEL_DIR")
    try:
        record = pack(Path(argv[0]))
    except RetrofitError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
