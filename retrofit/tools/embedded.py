"""Pack a model retrofit pretrains itself, with a record of how good it is: ``tiny`` into the package
(``--src tiny``), ``small`` (64 experts, top-8: too large to ship) into the cache, where ``--src small`` finds it.

`make tiny` / `make small` train it with the project's own code (recipes/<name>-pretrain.yaml) and then run
``python -m retrofit.tools.embedded [--name small] [--data-dir DIR] out/<name>-pretrain``: the weights are stored in
bf16, the held-out masked-token loss of exactly what is packed is measured on GSM8K test text next to a unigram
baseline (GSM8K train counts), and both go into the model card and ``training.json`` beside the weights. ``DIR``
holds gsm8k/; its default, ../shared/data, is relative to the working directory (the repository root, where make
runs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from retrofit.errors import RetrofitError
from retrofit.heldout import masked_token_loss, perplexity, text_sequences, unigram_loss
from retrofit.io.checkpoint import CheckpointDir
from retrofit.io.load import load_model
from retrofit.io.model_card import model_card
from retrofit.io.tokenizer_files import copy_tokenizer_files, load_tokenizer
from retrofit.io.writer import atomic_directory, save_tensors, write_json
from retrofit.models import family_of
from retrofit.models.moe import hub_state_dict
from retrofit.tools.checkout import DATA_DIR, gsm8k_problem

# The package's own asset, written in place: `make tiny` refreshes the checkout's copy, which then ships.
ASSET = Path(__file__).resolve().parents[1] / "assets" / "tiny"
FIELDS = ["question", "answer"]
# name -> (card title, what it is for)
PACKED = {"tiny": ("retrofit tiny (embedded default model)",
                   "It exists to show every retrofit command working offline on a CPU; it knows GSM8K-style text and "
                   "nothing else."),
          "small": ("retrofit small (64 experts, top-8)",
                    "It exists to measure the papers' routing claims at their geometry (LLaDA-MoE's 64 experts, "
                    "top-8) on a CPU; it knows GSM8K-style text and nothing else.")}


def destination(name: str) -> Path:
    from retrofit.sources import built_path

    return ASSET if name == "tiny" else built_path(name)


def measure(model_dir: Path, gsm8k: Path, heldout_examples: int = 400) -> dict:
    """Held-out masked-token loss on the first GSM8K test examples, next to a unigram model of the train text."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    train = text_sequences(tokenizer, gsm8k / "train.jsonl", FIELDS)
    heldout = text_sequences(tokenizer, gsm8k / "test.jsonl", FIELDS, max_examples=heldout_examples)
    loss = masked_token_loss(model, heldout, model.config.mask_token_id)
    baseline = unigram_loss(train, heldout, model.config.vocab_size)
    return {"heldout_masked_token_loss": loss, "unigram_baseline_loss": baseline,
            "heldout_perplexity": perplexity(loss), "unigram_perplexity": perplexity(baseline),
            "heldout_tokens": int(heldout.numel()), "train_tokens": int(train.numel()),
            "parameters": sum(p.numel() for p in model.parameters())}


def pack(trained: Path, gsm8k: Path, dest: Path = ASSET, name: str = "tiny", heldout_examples: int = 400) -> dict:
    ckpt = CheckpointDir(trained)
    model = load_model(ckpt)
    metrics_file = trained / "metrics.jsonl"
    steps = json.loads(metrics_file.read_text().splitlines()[-1])["step"] if metrics_file.is_file() else None
    with atomic_directory(dest, force=True) as tmp:
        save_tensors(tmp / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in hub_state_dict(model).items()})
        config = family_of(model).converted_config(ckpt.config, model.config.mask_token_id,
                                                   model.config.router_settings)
        write_json(tmp / "config.json", config | {"torch_dtype": "bfloat16"})
        copy_tokenizer_files(ckpt.path, tmp)
        record = measure(tmp, gsm8k, heldout_examples)  # measured on exactly what ships (bf16 weights)
        record.update(steps=steps, recipe=f"recipes/{name}-pretrain.yaml", data="GSM8K train (question + answer)",
                      heldout=f"GSM8K test, first {heldout_examples} examples")
        write_json(tmp / "training.json", record)
        (tmp / "README.md").write_text(card(record, model.config, name))
    return record


def card(record: dict, config, name: str = "tiny") -> str:
    c = config
    title, purpose = PACKED[name]
    body = f"""A {name} LLaDA-MoE-architecture masked diffusion model ({record['parameters']:,} parameters:
{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_experts} experts top-{c.num_experts_per_tok},
expert size {c.expert_intermediate_size}, vocabulary {c.vocab_size}), token-choice routing, trained from
scratch by retrofit itself: `make {name}` (BPE tokenizer trained on GSM8K train text with `tokenizers`, then
`retrofit finetune {record['recipe']}`: all parameters, load-balancing loss, masked-diffusion
objective, {record['steps']} steps of 32 x 128 tokens). Stored in bf16.

| held-out text (GSM8K test) | nats/token | perplexity |
|---|---|---|
| this model, masked-token loss | {record['heldout_masked_token_loss']:.3f} | {record['heldout_perplexity']:.1f} |
| unigram baseline | {record['unigram_baseline_loss']:.3f} | {record['unigram_perplexity']:.1f} |

{purpose}
"""
    return model_card(title, body, tags=["llada-moe", "tc-routing"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrofit.tools.embedded", description=__doc__.splitlines()[0])
    parser.add_argument("trained", type=Path, metavar="TRAINED_MODEL_DIR", help="what `make tiny` trained")
    parser.add_argument("--name", choices=sorted(PACKED), default="tiny",
                        help="tiny (into the package) or small (into the cache, for --src small)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help=f"local data holding gsm8k/train.jsonl and gsm8k/test.jsonl (default {DATA_DIR})")
    args = parser.parse_args(argv)
    problem = gsm8k_problem(args.data_dir)
    if problem:  # before packing, which replaces the shipped model
        parser.error(problem)
    try:
        record = pack(args.trained, args.data_dir / "gsm8k", destination(args.name), args.name)
    except RetrofitError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
