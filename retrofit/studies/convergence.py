"""Study 1, EC-DLM's retrofit claim: from one TC checkpoint, how fast do EC's routers (alone or with LoRA, with
or without distillation from the TC model) win back the loss that swapping TC for EC costs, against the TC
control trained the same way and as long?"""

from __future__ import annotations

from pathlib import Path

from retrofit.studies.base import Run, Scale, Study, by_variant, fmt, mean_spread, seeds_text, verdict
from retrofit.studies.claims import HELD, INCONCLUSIVE, NOT_HELD, Claim, lower
from retrofit.studies.execute import finetune_run
from retrofit.studies.figures import curves

VARIANTS = {  # variant -> recipe overrides
    "tc": ("model.router={type: tc}",),
    "ec": (),
    "ec+distill": ("objective.distill.weight=1.0",),
    "ec+lora": ("trainable.mode=routers+lora",),
    "ec+lora+distill": ("trainable.mode=routers+lora", "objective.distill.weight=1.0"),
}


class Convergence(Study):
    name = "convergence"
    title = "Retrofit convergence: EC routers against the TC control"
    command = "retrofit study convergence"

    def runs(self, scale: Scale) -> list[Run]:
        return [Run(variant, seed, (*overrides, f"optim.seed={seed}")) for variant, overrides in VARIANTS.items()
                for seed in range(scale.seeds)]

    def execute(self, run: Run, study_dir: Path, work: Path, scale: Scale, progress) -> dict:
        return finetune_run(study_dir / "recipe.yaml", [*run.overrides, *scale.overrides], work, progress)

    def report(self, results: dict[str, dict], runs: list[Run], out: Path, scale: Scale) -> Path:
        groups = by_variant(results, runs)
        tc_start = groups["tc"][0]["curve"][0]["loss"]
        ec_start = groups["ec"][0]["curve"][0]["loss"]
        gap = ec_start - tc_start
        curves({v: [[(r["step"], r["loss"]) for r in res["curve"]] for res in seeds] for v, seeds in groups.items()},
               "router fine-tuning steps", "held-out loss (nats/token)",
               "Held-out loss while fine-tuning (mean over seeds, band: min to max)", out, "convergence",
               references={"TC checkpoint, untrained": tc_start})
        rows = ["| variant | trainable | held-out loss, step 0 | after fine-tuning | share of EC's gap won back |",
                "|---|---|---|---|---|"]
        finals = {}
        for variant, seeds in groups.items():
            final = [s["curve"][-1]["loss"] for s in seeds]
            finals[variant] = final
            won = [(ec_start - f) / gap for f in final] if variant != "tc" and gap > 0 else None
            mode = "routers + LoRA" if "lora" in variant else "routers"
            rows.append(f"| {variant} | {mode} | {seeds[0]['curve'][0]['loss']:.3f} | {fmt(final)} | "
                        f"{fmt([w * 100 for w in won], 1) + ' %' if won else '–'} |")
        steps = groups["ec"][0]["curve"][-1]["step"]
        tokens = groups["ec"][0]["curve"][-1]["tokens"]
        findings = _findings(finals, tc_start, ec_start) + [_speed(groups)]
        body = [
            f"# {self.title}", "",
            "The question (EC-DLM): a token-choice checkpoint is retrofitted with expert-choice routing by swapping "
            "its routers and briefly fine-tuning them. Does EC reach TC's loss, how fast, and does distillation from "
            "the TC model help? The TC control is trained the same way and as long, so that what fine-tuning alone "
            "buys is not credited to EC.", "",
            f"Setup: `{scale.model.name}` ({scale.model.about}), EC at capacity factor 1.0 (TC's FLOPs), "
            f"{steps} steps of router fine-tuning ({tokens:,} tokens of GSM8K train text, recipe `recipe.yaml`), "
            f"held-out masked-token loss on GSM8K test text with the same seeded masks for every run, "
            f"{seeds_text(len(next(iter(groups.values()))))} per variant (the seed sets the data order and the noise). "
            f"Scale: {scale.name}.", "",
            f"Command: `{scale.command(self)}` (resumable; run folders and results in `{scale.work_folder(self)}`).",
            "",
            *rows, "",
            f"Swapping TC for EC costs {gap:.3f} nats/token before any training (TC {tc_start:.3f}, EC "
            f"{ec_start:.3f}). Spread: ± one standard deviation over seeds.", "",
            "## Findings", "", *findings, "",
            "## Figures", "",
            "![held-out loss against steps](convergence.png)", "",
        ]
        path = out / "README.md"
        path.write_text("\n".join(body))
        return path


    def claims(self, results: dict[str, dict], runs: list[Run], scale: Scale) -> list:

        groups = by_variant(results, runs)
        tc_start, ec_start = groups["tc"][0]["curve"][0]["loss"], groups["ec"][0]["curve"][0]["loss"]
        finals = {v: [s["curve"][-1]["loss"] for s in seeds] for v, seeds in groups.items()}
        best = min((v for v in finals if v != "tc"), key=lambda v: mean_spread(finals[v])[0])
        mean, spread = mean_spread(finals[best])
        # "Reaches": within the seeds' spread counts; only TC's loss lower beyond it says no (one seed: unknown).
        reached = (NOT_HELD if lower([tc_start], finals[best]) == HELD
                   else HELD if len(finals[best]) > 1 else INCONCLUSIVE)
        steps = groups["ec"][0]["curve"][-1]["step"]
        won = (ec_start - mean) / max(ec_start - tc_start, 1e-9)
        retrofit = Claim(
            "EC-DLM", "A TC checkpoint given EC routers reaches TC's loss after brief router fine-tuning.",
            reached,
            f"best EC variant ({best}) {mean:.3f} ± {spread:.3f} after {steps} steps against TC's {tc_start:.3f}: "
            f"{won:.0%} of the {ec_start - tc_start:.3f} nats/token the swap costs won back")
        a, b = finals["ec+lora+distill"], finals["ec+lora"]
        distill = Claim(
            "retrofit", "Distillation from the TC model lowers the retrofitted model's loss.", lower(a, b),
            f"with LoRA {mean_spread(b)[0]:.3f} → {mean_spread(a)[0]:.3f} with distillation, routers only "
            f"{mean_spread(finals['ec'])[0]:.3f} → {mean_spread(finals['ec+distill'])[0]:.3f} (spread "
            f"{max(mean_spread(x)[1] for x in (a, b)):.3f})")
        return [retrofit, distill]


def _speed(groups: dict[str, list[dict]]) -> str:
    """How fast: the first evaluation by which each EC variant has 90% of its own final gain (mean curve)."""
    parts, firsts = [], []
    for variant, seeds in groups.items():
        if variant == "tc":
            continue
        steps = [r["step"] for r in seeds[0]["curve"]]
        mean = [sum(s["curve"][i]["loss"] for s in seeds) / len(seeds) for i in range(len(steps))]
        gain = mean[0] - mean[-1]
        if gain <= 0:  # nothing to have in hand: its loss ends where it started, or higher
            parts.append(f"{variant} never (its loss rises, {-gain:.3f})")
            continue
        first = next((step for step, loss in zip(steps, mean) if mean[0] - loss >= 0.9 * gain), steps[-1])
        parts.append(f"{variant} by step {first}")
        firsts.append(first)
    flat = bool(firsts) and max(firsts) <= steps[-1] * 2 / 3
    return ("- How fast: 90% of each variant's final gain is in hand " + ", ".join(parts) + " (held-out "
            f"evaluations every {steps[1] - steps[0]} steps)"
            + ("; the curves flatten well before the last step." if flat else "."))


def _findings(finals: dict[str, list[float]], tc_start: float, ec_start: float) -> list[str]:
    """Sentences computed from the numbers, so the README says what this run shows and nothing else."""
    tc_mean, tc_std = mean_spread(finals["tc"])
    lines = []
    best = min((v for v in finals if v != "tc"), key=lambda v: mean_spread(finals[v])[0])
    best_mean, best_std = mean_spread(finals[best])
    if best_mean <= tc_start:
        lines.append(f"- The best EC variant ({best}, {best_mean:.3f}) reaches the untrained TC checkpoint's loss "
                     f"({tc_start:.3f}).")
    else:
        lines.append(f"- No EC variant reaches the untrained TC checkpoint's loss ({tc_start:.3f}): the best, {best}, "
                     f"ends at {best_mean:.3f}, {best_mean - tc_start:.3f} above it, having won back "
                     f"{(ec_start - best_mean) / max(ec_start - tc_start, 1e-9):.0%} of the gap.")
    lines.append(f"- The TC control moves from {tc_start:.3f} to {tc_mean:.3f} ± {tc_std:.3f} under the same "
                 f"fine-tuning; the best EC variant stays {best_mean - tc_mean:+.3f} from it.")
    for with_, without in (("ec+distill", "ec"), ("ec+lora+distill", "ec+lora")):
        a, b = mean_spread(finals[with_])[0], mean_spread(finals[without])[0]
        lines.append(f"- Distillation from the TC model, {without} → {with_}: {b:.3f} → {a:.3f}; "
                     f"{verdict(finals[with_], finals[without])}.")
    a, b = mean_spread(finals["ec+lora"])[0], mean_spread(finals["ec"])[0]
    lines.append(f"- LoRA on the attention projections beside the routers changes the result by {a - b:+.3f} "
                 "nats/token (ec+lora against ec).")
    return lines
