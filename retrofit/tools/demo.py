"""`make demo`: the whole tool on the embedded tiny model, offline, on a CPU, in a few minutes.

Converts ``tiny`` (token choice) to expert choice, fine-tunes the EC routers with recipes/tiny-ec.yaml, then
compares TC, EC, EC fine-tuned and block routing on GSM8K (and ARC/MMLU where local copies exist) with
``--limit``, next to the held-out masked-token loss, unique experts per layer and forward, and generation speed.
Runs from the repository root, as `make demo` does: the recipe and the default paths are relative to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from retrofit.convert import convert, plan_conversion
from retrofit.eval.adapter import RetrofitLM
from retrofit.heldout import masked_token_loss, text_sequences
from retrofit.eval.runner import run_eval
from retrofit.io.tokenizer_files import load_tokenizer
from retrofit.progress import PlainProgress
from retrofit.routers import router_settings
from retrofit.sources import resolve_source
from retrofit.tools.checkout import DATA_DIR, gsm8k_problem, recipe_problem
from retrofit.training.recipe import load_recipe
from retrofit.training.trainer import Finetune

RECIPE = Path("recipes") / "tiny-ec.yaml"
console = Console()


def prepare(out: Path, data: Path, steps: int | None = None) -> dict[str, tuple[str, dict]]:
    """Build the EC and EC fine-tuned models; returns variant → (model, router overrides). The fine-tuning
    reads GSM8K train from ``data`` (not the recipe's own path), so --data-dir governs all the demo reads;
    ``steps`` replaces the recipe's number of fine-tuning steps."""
    ec = out / "tiny-ec"
    console.print("[bold]1. convert[/] tiny -> expert choice")
    convert(plan_conversion(resolve_source("tiny"), router_settings(type="ec"), ec), force=True)
    console.print("[bold]2. finetune[/] EC routers with recipes/tiny-ec.yaml")
    overrides = [f"model.source={ec}", f"checkpoint.output_dir={out / 'tiny-ec-ft'}",
                 f"data.path={(data / 'gsm8k' / 'train.jsonl').resolve()}"]
    overrides += [] if steps is None else [f"optim.max_steps={steps}"]
    recipe, recipe_dir = load_recipe(RECIPE, overrides)
    if (out / "tiny-ec-ft").exists():
        shutil.rmtree(out / "tiny-ec-ft")
    plain = PlainProgress(console, "finetune steps", recipe.optim.max_steps)  # lines when run into a log
    Finetune(recipe, recipe_dir, progress=lambda done, total, values: plain.update(
        done, f"loss {values['diffusion']:.4f}")).run()
    # guard 2 of 8 experts is the paper's 16 of 64 scaled to the tiny model.
    return {"TC (checkpoint)": ("tiny", {}), "EC": (str(ec), {}), "EC fine-tuned": (str(out / "tiny-ec-ft"), {}),
            "block (32, guard 2)": ("tiny", {"router": "block", "guard_size": 2})}


def tasks_available(data: Path) -> list[str]:
    """GSM8K always (the demo needs it); ARC and MMLU when their local copies are in ``data``."""
    return ["gsm8k"] + [name for name in ("arc", "mmlu") if (data / name).is_dir()]


def evaluate_variant(model: str, router: dict, tasks: list[str], limit: int, heldout, data: Path,
                     gen_length: int) -> dict:
    lm = RetrofitLM(model, **router, mc_num=8, batch_size=8, gen_length=gen_length, steps=gen_length,
                    denoise_block=32, progress=False)
    loss = masked_token_loss(lm.model, heldout, lm.mask_id)
    lm.model.enable_routing_stats(block_length=32)
    # GSM8K alone is timed and gives the routing figures: it is the generation task, where routing per
    # denoising block is what block routing changes; ARC/MMLU (likelihood scoring) follow for their scores.
    started = time.perf_counter()
    record = run_eval(lm, ["gsm8k"], limit=limit, data_dir=data)
    elapsed = time.perf_counter() - started
    generated = limit * lm.sampler.gen_length
    routing = record["routing"]
    others = [task for task in tasks if task != "gsm8k"]
    if others:
        record["results"].update(run_eval(lm, others, limit=limit, data_dir=data)["results"])
    return {"results": record["results"], "heldout_loss": loss, "unique_experts": routing["unique_experts"],
            "unique_experts_per_block": routing["unique_experts_per_block"], "tokens_per_s": generated / elapsed,
            "router": lm.router.describe()}


def table(rows: dict[str, dict], tasks: list[str]) -> Table:
    """The comparison, narrow enough for an 80-column terminal or log (short headers, explained below it)."""
    out = Table(title="retrofit demo: tiny model, TC vs EC vs EC fine-tuned vs block", box=box.SIMPLE_HEAD,
                collapse_padding=True, pad_edge=False, show_edge=False,
                caption="acc / exact match (flexible) per task; loss: held-out nats/token; "
                        "experts: unique per layer and forward, per 32-token block; tok/s: generation")
    out.add_column("variant", no_wrap=True)
    metrics = [("gsm8k", "exact_match[flexible-extract]", "gsm8k")]
    if "arc" in tasks:
        metrics += [("arc_challenge", "acc", "arc-c"), ("arc_easy", "acc", "arc-e")]
    if "mmlu" in tasks:
        metrics.append(("mmlu", "acc", "mmlu"))
    for header in [m[2] for m in metrics] + ["loss", "exp/fwd", "exp/blk", "tok/s"]:
        out.add_column(header, justify="right", no_wrap=True)
    for name, row in rows.items():
        scores = [f"{row['results'].get(t, {}).get(m, float('nan')):.3f}" for t, m, _ in metrics]
        out.add_row(name, *scores, f"{row['heldout_loss']:.3f}", f"{row['unique_experts']:.1f}",
                    f"{row['unique_experts_per_block']:.2f}", f"{row['tokens_per_s']:.0f}")
    return out


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m retrofit.tools.demo", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("out") / "demo", help="where the models and demo.json go")
    parser.add_argument("--limit", type=positive, default=8, help="documents per task")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help=f"local benchmark data: gsm8k/, and arc/, mmlu/ where present (default {DATA_DIR})")
    parser.add_argument("--steps", type=positive, default=None,
                        help="router fine-tuning steps (default: the recipe's)")
    parser.add_argument("--gen-length", type=positive, default=64,
                        help="generated tokens per GSM8K answer (a multiple of the 32-token block)")
    parser.add_argument("--heldout-examples", type=positive, default=200,
                        help="GSM8K test examples in the held-out masked-token loss")
    args = parser.parse_args(argv)
    problem = gsm8k_problem(args.data_dir) or recipe_problem(RECIPE, "demo")
    if problem:
        parser.error(problem)
    if args.gen_length % 32:
        parser.error(f"--gen-length must be a multiple of 32 (the denoising block), got {args.gen_length}")
    args.out.mkdir(parents=True, exist_ok=True)
    variants = prepare(args.out, args.data_dir, args.steps)
    tasks = tasks_available(args.data_dir)
    source = resolve_source("tiny").path
    heldout = text_sequences(load_tokenizer(source), args.data_dir / "gsm8k" / "test.jsonl", ["question", "answer"],
                             max_examples=args.heldout_examples)
    rows = {}
    for name, (model, router) in variants.items():
        console.print(f"[bold]3. eval[/] {name}: {', '.join(tasks)} (limit {args.limit})")
        rows[name] = evaluate_variant(model, router, tasks, args.limit, heldout, args.data_dir, args.gen_length)
    console.print(table(rows, tasks))
    (args.out / "demo.json").write_text(json.dumps(rows, indent=2) + "\n")
    console.print(f"wrote {args.out / 'demo.json'}")


if __name__ == "__main__":
    main()
