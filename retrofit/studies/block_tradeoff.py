"""Study 3, dMoE's claim: block routing keeps a small core set of experts per denoising block. How many fewer
unique experts per block does each (core threshold, guard size) touch, for how much held-out loss, before and
after fine-tuning the routers (alone, or with LoRA as a cheap stand-in for dMoE's whole-model fine-tuning)?
Where, if anywhere, is "at least 3x fewer experts for less than 2% more loss"?"""

from __future__ import annotations

from pathlib import Path

import torch

from retrofit.studies.base import Run, Scale, Study, by_variant, fmt, mean_spread, seeds_text
from retrofit.studies.claims import HELD, INCONCLUSIVE, NOT_HELD, Claim, lower
from retrofit.studies.execute import finetune_run
from retrofit.studies.figures import save_figure, series_style, plt, WIDE

THRESHOLDS = (0.2, 0.4, 0.6, 0.8, 0.9)
# The guard sizes and the settings fine-tuned are the model's (retrofit.studies.models): a guard below top-k cannot
# give each token its k.
BLOCK = 32
TARGET_FEWER, TARGET_LOSS = 3.0, 0.02


def _router(p: float, guard: int) -> str:
    return f"{{type: block, block_length: {BLOCK}, core_threshold: {p}, guard_size: {guard}}}"


class BlockTradeoff(Study):
    name = "block-tradeoff"
    title = "Block routing's trade-off: unique experts per block against held-out loss"
    command = "retrofit study block-tradeoff"

    def runs(self, scale: Scale) -> list[Run]:
        model = scale.model
        # A toy run measures the one setting it fine-tunes, untrained too: its claims compare the two.
        grid = [(p, g) for p in THRESHOLDS for g in model.guards] if not scale.toy else list(model.tuned[:1])
        runs = [Run("tc", 0, params={"router": "{type: tc}"})]
        runs += [Run(f"p{p}-g{g}", 0, params={"router": _router(p, g), "p": p, "guard": g}) for p, g in grid]
        for p, g in model.tuned[:1] if scale.toy else model.tuned:
            for mode in ("routers", "routers+lora"):
                runs += [Run(f"p{p}-g{g}-{mode.replace('+', '-')}", seed,
                             (f"model.router={_router(p, g)}", f"trainable.mode={mode}", f"optim.seed={seed}"),
                             {"p": p, "guard": g, "mode": mode}) for seed in range(scale.seeds)]
        return runs

    def execute(self, run: Run, study_dir: Path, work: Path, scale: Scale, progress) -> dict:
        recipe = study_dir / "recipe.yaml"
        if "mode" in run.params:  # fine-tuned, then measured as it was saved (LoRA merged)
            result = finetune_run(recipe, [*run.overrides, *scale.overrides], work, progress)
            model_dir, router = result["model"], None
        else:
            result, model_dir, router = {}, scale.model.source, run.params["router"]
        progress("measuring")
        result.update(measure(recipe, scale, model_dir, router))
        result.update({k: v for k, v in run.params.items() if k != "router"})
        return result

    def report(self, results: dict[str, dict], runs: list[Run], out: Path, scale: Scale) -> Path:
        tc, grid, tuned = _split(results, runs)
        figure = _scatter(tc, grid, tuned, out)
        rows = ["| core threshold p | guard | unique experts / block | fewer than TC | held-out loss | vs TC |",
                "|---|---|---|---|---|---|"]
        rows.append(f"| TC | – | {tc['unique_per_block']:.2f} | 1.00x | {tc['loss']:.3f} | – |")
        hits = []
        for variant, r in grid.items():
            fewer, worse = tc["unique_per_block"] / r["unique_per_block"], r["loss"] / tc["loss"] - 1
            rows.append(f"| {r['p']} | {r['guard']} | {r['unique_per_block']:.2f} | {fewer:.2f}x | {r['loss']:.3f} | "
                        f"{worse:+.1%} |")
            if fewer >= TARGET_FEWER and worse < TARGET_LOSS:
                hits.append(variant)
        tuned_rows = ["| setting | trained | unique experts / block | held-out loss before | after | vs TC |",
                      "|---|---|---|---|---|---|"]
        for variant, seeds in tuned.items():
            first = seeds[0]
            before = grid.get(f"p{first['p']}-g{first['guard']}", {}).get("loss")
            losses = [s["loss"] for s in seeds]
            tuned_rows.append(f"| p {first['p']}, guard {first['guard']} | {first['mode']} | "
                              f"{fmt([s['unique_per_block'] for s in seeds], 2)} | "
                              f"{before:.3f} | {fmt(losses)} | {mean_spread(losses)[0] / tc['loss'] - 1:+.1%} |"
                              if before is not None else f"| {variant} | {first['mode']} | – | – | {fmt(losses)} | – |")
        n = len(next(iter(tuned.values()))) if tuned else 0
        steps = next(iter(tuned.values()))[0]["curve"][-1]["step"] if tuned else 0
        findings = _findings(tc, grid, tuned, hits)
        body = [
            f"# {self.title}", "",
            "The question (dMoE): the tokens of a denoising block vote, a core set of experts (cumulative vote up to "
            "p, at least `guard` experts) is kept for the block, and each token takes its top-k inside it. How many "
            "unique experts per block does that save, for how much loss, and does fine-tuning recover the loss?", "",
            f"Setup: `{scale.model.name}` ({scale.model.experts} experts, top-{scale.model.top_k}). Held-out "
            f"masked-token loss on GSM8K test text (same seeded masks for "
            f"every row) and unique experts per {BLOCK}-token block, per MoE layer and forward, counted during that "
            f"evaluation. Grid: core threshold p in {', '.join(map(str, THRESHOLDS))} × guard size in "
            f"{', '.join(map(str, scale.model.guards))}, without training. Then two settings fine-tuned for "
            f"{steps} steps with distillation from the TC model (recipe `recipe.yaml`): "
            f"routers only, and routers + LoRA on the attention projections, {seeds_text(n)} each. Scale: {scale.name}.",
            "",
            f"Command: `{scale.command(self)}` (resumable; run folders and results in `{scale.work_folder(self)}`).",
            "",
            "## Without training", "", *rows, "",
            "## After fine-tuning", "", *tuned_rows, "",
            "Spread: ± one standard deviation over seeds.", "",
            "## Findings", "", *findings, "",
            f"GSM8K scores are left out: a model of `{scale.model.name}`'s size answers next to no GSM8K question "
            "with any router (`tiny`: 0 to 1 of 8, `make demo`), so they cannot show a trade-off.", "",
            "## Figure", "", f"![{figure.stem}]({figure.name})", "",
        ]
        path = out / "README.md"
        path.write_text("\n".join(body))
        return path


    def claims(self, results: dict[str, dict], runs: list[Run], scale: Scale) -> list:
        tc, grid, tuned = _split(results, runs)
        return [_core_claim(tc, grid, scale.model.tuned[0]), _tuning_claim(tc, grid, tuned)]


def _core_claim(tc: dict, grid: dict, paper: tuple[float, int]):
    """``paper``: the model's counterpart of dMoE's setting (p 0.6, guard 16 of 64), stated beside the best."""

    fewer = {v: tc["unique_per_block"] / r["unique_per_block"] for v, r in grid.items()}
    cost = {v: r["loss"] / tc["loss"] - 1 for v, r in grid.items()}
    best = max((v for v in grid if cost[v] < TARGET_LOSS), key=fewer.get, default=None)
    held = best is not None and fewer[best] >= TARGET_FEWER
    if held:
        measured = (f"p {grid[best]['p']}, guard {grid[best]['guard']}: {fewer[best]:.2f}x fewer "
                    f"({tc['unique_per_block']:.1f} → {grid[best]['unique_per_block']:.1f} per block) for "
                    f"{cost[best]:+.1%} loss, untrained")
    else:
        cheapest = min((v for v in grid if fewer[v] >= TARGET_FEWER), key=cost.get, default=None)
        measured = (f"within {TARGET_LOSS:+.0%} loss at most {fewer[best]:.2f}x fewer" if best else
                    f"no setting within {TARGET_LOSS:+.0%} loss") + (
            f"; {TARGET_FEWER:.0f}x fewer costs {cost[cheapest]:+.1%} at best (untrained)" if cheapest else "")
    own = f"p{paper[0]}-g{paper[1]}"
    if own in grid and own != best:
        measured += f"; p {paper[0]}, guard {paper[1]}: {fewer[own]:.2f}x fewer for {cost[own]:+.1%}"
    return Claim("dMoE", f"A block's core set cuts the unique experts per block several-fold for little loss "
                 f"(paper: 69.5 → 14.6 per forward, 99.11% of accuracy kept; here: at least {TARGET_FEWER:.0f}x for "
                 f"under {TARGET_LOSS:.0%} more loss).", HELD if held else NOT_HELD, measured)


def _tuning_claim(tc: dict, grid: dict, tuned: dict):

    won = {}
    for variant, seeds in tuned.items():
        before = grid[f"p{seeds[0]['p']}-g{seeds[0]['guard']}"]["loss"]
        after = [s["loss"] for s in seeds]
        won[variant] = ((before - mean_spread(after)[0]) / max(before - tc["loss"], 1e-9), after, before)
    top = max(won, key=lambda v: won[v][0])
    share, after, before = won[top]
    # Held: the loss falls beyond the seeds' spread and by at least half the gap; one seed cannot tell.
    verdict = (INCONCLUSIVE if len(after) < 2 else HELD if lower(after, [before]) == HELD and share >= 0.5
               else NOT_HELD)
    return Claim("dMoE", "Fine-tuning with block routing on wins back at least half the loss the core set costs "
                 "(dMoE fine-tunes the whole model; here routers, or routers + LoRA).", verdict,
                 f"best of {len(won)} ({top}): {before / tc['loss'] - 1:+.1%} → "
                 f"{mean_spread(after)[0] / tc['loss'] - 1:+.1%} of TC's loss, {round(share, 2) + 0.0:.0%} of the gap "
                 "won back")  # + 0.0: a share that rounds to -0 prints as 0%


def _split(results: dict[str, dict], runs: list[Run]) -> tuple[dict, dict, dict]:
    """The TC row, the untrained grid (one result per setting) and the fine-tuned settings (their seeds)."""
    groups = by_variant(results, runs)
    tc = groups.pop("tc")[0]
    grid = {v: seeds[0] for v, seeds in groups.items() if "mode" not in next(r for r in runs if r.variant == v).params}
    return tc, grid, {v: seeds for v, seeds in groups.items() if v not in grid}


def measure(recipe: Path, scale: Scale, model_dir: str, router: str | None) -> dict:
    """Held-out loss (the recipe's heldout section, its seed) and unique experts per block of ``model_dir``
    under ``router`` (None: the model's own)."""
    import yaml

    from retrofit.heldout import masked_token_loss
    from retrofit.io.load import load_model
    from retrofit.io.text_data import build_sequences
    from retrofit.io.tokenizer_files import load_tokenizer
    from retrofit.routers import router_settings
    from retrofit.sources import resolve_source
    from retrofit.training.recipe import load_recipe

    parsed, recipe_dir = load_recipe(recipe, list(scale.overrides))
    section = parsed.heldout
    path = resolve_source(model_dir).path
    model = load_model(path, router=router_settings(yaml.safe_load(router)) if router else None)
    sequences = build_sequences(section.data, recipe_dir, load_tokenizer(path)).input_ids
    model.enable_routing_stats(block_length=BLOCK)
    with torch.no_grad():
        loss = masked_token_loss(model, sequences, model.config.mask_token_id, section.samples, seed=section.seed)
    stats = model.routing_stats()
    return {"loss": loss, "unique_per_block": stats.unique_experts_per_block,
            "unique_per_forward": stats.unique_experts, "router_settings": model.config.router_settings.model_dump()}


def _scatter(tc: dict, grid: dict, tuned: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=WIDE)
    ax.scatter([tc["unique_per_block"]], [tc["loss"]], marker="*", s=160, color="black", label="TC", zorder=3)
    for i, guard in enumerate(sorted({r["guard"] for r in grid.values()})):
        points = sorted((r["unique_per_block"], r["loss"], r["p"]) for r in grid.values() if r["guard"] == guard)
        style = series_style(i)
        ax.plot([x for x, _, _ in points], [y for _, y, _ in points], marker="o", label=f"guard {guard} (p varies)",
                **style)
        for x, y, p in points:
            ax.annotate(f"p{p}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for j, (variant, seeds) in enumerate(tuned.items()):
        xs = [s["unique_per_block"] for s in seeds]
        ys = [s["loss"] for s in seeds]
        ax.scatter(xs, ys, marker="^" if "lora" in variant else "s", color=series_style(j + 3)["color"],
                   label=f"{variant} (fine-tuned)", zorder=3)
    ax.axhline(tc["loss"] * (1 + TARGET_LOSS), color="grey", linestyle=":", linewidth=1, label="TC loss + 2%")
    ax.axvline(tc["unique_per_block"] / TARGET_FEWER, color="grey", linestyle="--", linewidth=1,
               label="3x fewer experts than TC")
    ax.set(xlabel=f"unique experts per {BLOCK}-token block (per layer and forward)",
           ylabel="held-out loss (nats/token)", title="Experts touched per block against held-out loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, out, "tradeoff")


def _findings(tc: dict, grid: dict, tuned: dict, hits: list[str]) -> list[str]:
    lines = []
    if hits:
        lines.append(f"- At least 3x fewer unique experts per block for under 2% more loss, without training: "
                     f"{', '.join(hits)}.")
    else:
        near = min(grid.values(), key=lambda r: r["loss"] if tc["unique_per_block"] / r["unique_per_block"] >= TARGET_FEWER
                   else float("inf"), default=None)
        if near and tc["unique_per_block"] / near["unique_per_block"] >= TARGET_FEWER:
            lines.append(f"- Without training, no setting gives 3x fewer experts per block for under 2% more loss: the "
                         f"cheapest 3x setting (p {near['p']}, guard {near['guard']}) costs "
                         f"{near['loss'] / tc['loss'] - 1:+.1%}.")
        else:
            lines.append("- Without training, no setting reaches 3x fewer experts per block.")
    for variant, seeds in tuned.items():
        first = seeds[0]
        before = grid.get(f"p{first['p']}-g{first['guard']}")
        after = mean_spread([s["loss"] for s in seeds])[0]
        fewer = tc["unique_per_block"] / mean_spread([s["unique_per_block"] for s in seeds])[0]
        if before:
            won = (before["loss"] - after) / max(before["loss"] - tc["loss"], 1e-9)
            lines.append(f"- {variant}: {fewer:.2f}x fewer experts per block than TC; fine-tuning takes the loss from "
                         f"{before['loss'] / tc['loss'] - 1:+.1%} to {after / tc['loss'] - 1:+.1%} of TC's "
                         f"({won:.0%} of the gap).")
    return lines
