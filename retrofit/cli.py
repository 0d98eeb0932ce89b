"""The `retrofit` command line (Typer). Each command is a thin shell over a library function; user mistakes
become one red line and exit status 1, never a traceback."""

from __future__ import annotations

import functools
import inspect
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retrofit.errors import RetrofitError, whole_at_least
from retrofit.models import FAMILIES

# The `retrofit` console command lists these commands without importing this module (retrofit_command);
# tests and `retrofit_command` run them from this app.
app = typer.Typer(
    name="retrofit",
    help="Retrofit expert-choice (EC) or block-level routing onto token-choice diffusion-LM MoE checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help (click's formatter): rich's boxed tables cut option names and choices at 80 columns.
    rich_markup_mode=None,
)
out_console = Console()
err_console = Console(stderr=True)
error_console = Console(stderr=True)  # never quieted: an error on any rank of a launched run must show


def rank_zero_only(command):
    """Under a launcher, a command that only reads and writes files (convert, create-tiny, validate) runs once,
    on rank 0; the other ranks have nothing to compute and return at once."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from retrofit.distributed import is_main

        return command(*args, **kwargs) if is_main() else None

    return wrapper


def one_process(command):
    """A command that runs in one process (inspect, study): refused under a launcher, in one line."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from retrofit.distributed import launched

        if launched():
            raise RetrofitError(f"`retrofit {command.__name__.replace('_', '-')}` runs in one process; start it "
                                "without a launcher (finetune and eval are the commands that use several)")
        return command(*args, **kwargs)

    return wrapper


def user_errors(command):
    """Turn the errors a user can cause into one line on stderr and exit status 1."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RetrofitError as exc:
            # escape(): a message may hold "[word]" (a path, a list), which rich would take for markup.
            error_console.print(f"[bold red]{_rank_prefix()}error:[/] {escape(str(exc))}", highlight=False,
                                soft_wrap=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            error_console.print(f"[bold red]{_rank_prefix()}error:[/] invalid {escape(where)}: "
                                f"{escape(first['msg'])}", highlight=False, soft_wrap=True)
        except KeyboardInterrupt:
            error_console.print(f"[bold red]{_rank_prefix()}interrupted:[/] nothing was written", highlight=False)
        raise typer.Exit(1)

    return wrapper


def _rank_prefix() -> str:
    from retrofit.distributed import is_main, rank

    return "" if is_main() else f"rank {rank()}: "


def flag_options(flags_of, into: str):
    """A decorator giving a command one option per flag of a registry's settings (``retrofit.flags``), with the
    same names, help and default in every command that takes them; the values the user gave reach the command as
    one dict named ``into`` (dest -> value; flags left out are absent)."""

    def decorate(command):
        flags = flags_of()
        original = inspect.signature(command)
        params = [p for p in original.parameters.values() if p.name != into]
        for flag in flags:
            names = [f"{flag.flag}/--no-{flag.flag[2:]}"] if flag.kind is bool else [flag.flag]
            metavar = "<choice>" if flag.choices else None
            option = typer.Option(None, *names, help=flag.help, metavar=metavar, show_default=False)
            params.append(inspect.Parameter(flag.dest, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=Optional[flag.kind]))

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            given = {f.dest: kwargs.pop(f.dest) for f in flags if kwargs.get(f.dest) is not None}
            kwargs.pop(into, None)
            for f in flags:
                kwargs.pop(f.dest, None)
            return command(*args, **{into: given}, **kwargs)

        wrapper.__signature__ = original.replace(parameters=params)
        return wrapper

    return decorate


def _router_flags():
    from retrofit.routers.flags import router_flags

    return router_flags()


def _sampler_flags():
    from retrofit.eval.samplers import sampler_flags

    return sampler_flags()


# Router settings (convert, eval, inspect) and sampler options (eval, inspect) as flags, from their registries.
router_options = flag_options(_router_flags, "router_flags")
sampler_options = flag_options(_sampler_flags, "sampler_options")


def _router_names() -> str:
    from retrofit.routers import ROUTERS

    return ", ".join(ROUTERS)


def _model_names() -> str:
    """Every name --src/--model takes besides paths and Hub ids, from the registries."""
    from retrofit.models import hub_models
    from retrofit.sources import BUILT, EMBEDDED, GENERATED

    return ", ".join([*hub_models(), *EMBEDDED, *BUILT, *GENERATED])


@app.command()
@user_errors
@rank_zero_only
@router_options
def convert(
    src: str = typer.Option(..., "--src", help=f"Registry name ({_model_names()}), Hub id (org/name) or local "
                                               "checkpoint directory."),
    router: str = typer.Option(..., "--router", metavar="NAME",
                               help=f"Router to install: {_router_names()} (tc: the checkpoint's own token choice; "
                                    "ec: expert choice; block: dMoE's block routing). Its settings are the flags "
                                    "below, each marked with the routers it applies to."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output directory (default: out/<src>-<router>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output directory."),
    sampler: Optional[str] = typer.Option(None, "--sampler", metavar="NAME", help="Record the sampler the output "
                                          "generates with by default (llada2.1 for a LLaDA2.1 checkpoint given by "
                                          "path; its registry names record it themselves)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only show which routers would be replaced."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload the result and check it against "
                                                                   "the source."),
    router_flags: dict = None,
):
    """Load a token-choice checkpoint, swap its routers, save a complete model directory."""
    from retrofit.convert import convert as run_convert
    from retrofit.convert import plan_conversion
    from retrofit.routers.flags import settings_from_flags
    from retrofit.sources import resolve_source

    target = settings_from_flags(router, router_flags)
    source = resolve_source(src)
    plan = plan_conversion(source, target, out, sampler)
    if dry_run:
        out_console.print(_plan_table(plan))
        out_console.print(f"dry run: would write {escape(str(plan.out))}; nothing written.")
        return
    command = "retrofit " + shlex.join(sys.argv[1:]) if sys.argv[1:] else ""
    with err_console.status("converting") as status:
        report = run_convert(plan, force=force, command=command, verify=verify,
                             step=lambda msg: status.update(msg))
    out_console.print(f"[green]wrote[/] {escape(str(report.out))}: router {target.describe()}")
    out_console.print(f"  {report.shards.summary()}")
    if verify:
        if report.logits_identical:
            logits = "bit-identical to the source"
        elif report.max_logit_diff == 0:  # another router that chose as the source did on this probe
            logits = "identical to the source's on the probe (the new routing chose the same experts there)"
        else:
            logits = f"finite, and up to {report.max_logit_diff:.3g} from the source's (expected: the routing changed)"
        out_console.print(f"  verified {report.tensors_checked} unchanged tensors; logits {logits}")


def _plan_table(plan) -> Table:
    table = Table(title=f"{plan.source.origin}: {plan.config.router_settings.describe()}  ->  "
                        f"{plan.target.describe()}")
    for col in ("layer", "router tensor", "shape", "dtype", "shard"):
        table.add_column(col, overflow="fold")
    for s in plan.swaps:
        table.add_row(str(s.layer), s.name, "x".join(map(str, s.shape)), s.dtype, s.shard)
    return table


@app.command("create-tiny")
@user_errors
@rank_zero_only
def create_tiny(
    ctx: typer.Context,
    out_dir: Path = typer.Argument(..., help="Directory to write, laid out like a Hub snapshot."),
    preset: Optional[str] = typer.Option(
        None, "--preset", metavar="NAME",
        help="Write a real model's full shapes instead of a tiny one. 'llada-moe-7b': LLaDA-MoE-7B-A1B "
             "(7,356,880,896 parameters, vocab 157,184, 16 layers, 64 experts top-8) with random bf16 "
             "weights in the Hub's three 5 GB shards, about 14.7 GB on disk and a few minutes to write "
             "(one tensor in memory at a time), and a byte-level tokenizer padded to the real vocabulary "
             "(<|endoftext|> 156892, <|mask|> 156895). 'llada2-mini': LLaDA2.0-mini (16,255,638,528 "
             "parameters and 19 expert biases, 32.5 GB in seven 5 GB shards). Only --seed and --force go "
             "with it."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights."),
    family: str = typer.Option("llada-moe", "--family", metavar="NAME",
                               help="Model family of the tiny model: " + ", ".join(FAMILIES)
                                    + "."),
    shard_kb: int = typer.Option(96, "--shard-kb", help="Maximum shard size in KiB (small, to get several)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing directory."),
    tokenizer_data: Optional[Path] = typer.Option(None, "--tokenizer-data", help="Train a BPE tokenizer on "
                                                  "this jsonl file instead of using the byte tokenizer."),
    text_fields: str = typer.Option("question,answer", "--text-fields", help="Fields of --tokenizer-data."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="BPE vocabulary size (with --tokenizer-data; at "
                                                              "least 258: the 256 bytes and 2 special tokens)."),
    hidden_size: int = typer.Option(64, "--hidden-size"),
    layers: int = typer.Option(2, "--layers"),
    heads: int = typer.Option(4, "--heads"),
    experts: int = typer.Option(8, "--experts"),
    top_k: int = typer.Option(2, "--top-k"),
    expert_size: int = typer.Option(32, "--expert-size", help="Expert intermediate size."),
):
    """Write a tiny random model (default LLaDA-MoE: 2 layers, 8 experts, top-2) laid out exactly like its Hub
    snapshot; with --preset llada-moe-7b, the full-size model's shapes (~14.7 GB)."""
    if preset is not None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        from retrofit.io.writer import check_destination
        from retrofit.tiny import create_preset, preset_total_bytes

        shape_flags = {"family": "--family", "shard_kb": "--shard-kb", "tokenizer_data": "--tokenizer-data",
                       "text_fields": "--text-fields",
                       "vocab_size": "--vocab-size", "hidden_size": "--hidden-size", "layers": "--layers",
                       "heads": "--heads", "experts": "--experts", "top_k": "--top-k", "expert_size": "--expert-size"}
        # typer vendors click, so compare the ParameterSource by name (COMMANDLINE or ENVIRONMENT = given).
        given = [flag for param, flag in shape_flags.items()
                 if getattr(ctx.get_parameter_source(param), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")]
        if given:
            raise RetrofitError(f"--preset fixes the shapes; drop {', '.join(given)} (only --seed and --force "
                                f"go with --preset)")
        total = preset_total_bytes(preset)  # an unknown preset fails here, before anything is written
        check_destination(out_dir.expanduser().resolve(), force)  # before the progress bar shows
        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=err_console, transient=False) as progress:
            task = progress.add_task(f"writing {preset}", total=total)
            path = create_preset(out_dir, preset, seed=seed, force=force,
                                 on_bytes=lambda n: progress.advance(task, n))
        shards = sorted(p.name for p in path.glob("*.safetensors"))
        out_console.print(f"[green]wrote[/] {escape(str(path))}: {preset}, {len(shards)} shard(s), "
                          f"{total / 1e9:.2f} GB of weights, tokenizer, config.json")
        return
    from retrofit.tiny import create_tiny as build, tiny_shape

    if family not in FAMILIES:
        raise RetrofitError(f"unknown --family {family!r}; use {', '.join(FAMILIES)}")
    _check_tiny_shape(hidden_size=hidden_size, layers=layers, heads=heads, experts=experts, top_k=top_k,
                      expert_size=expert_size, shard_kb=shard_kb)
    if tokenizer_data is not None:
        whole_at_least("--vocab-size", vocab_size, 258)  # the 256 byte tokens and the 2 special tokens
    chosen = FAMILIES[family]
    dims = dict(family=chosen, **tiny_shape(chosen, hidden_size=hidden_size, layers=layers, heads=heads,
                                            experts=experts, top_k=top_k, expert_size=expert_size))
    texts = None
    if tokenizer_data is not None:
        from retrofit.io.text_data import read_texts

        texts = read_texts(tokenizer_data, [f.strip() for f in text_fields.split(",") if f.strip()],
                           "see --text-fields")
    path = build(out_dir, seed=seed, max_shard_bytes=shard_kb * 1024, force=force, tokenizer_texts=texts,
                 vocab_size=vocab_size, **dims)
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    out_console.print(f"[green]wrote[/] {escape(str(path))}: {len(shards)} shard(s), tokenizer, config.json")


def _check_tiny_shape(**flags) -> None:
    """create-tiny's shape flags in range, and consistent with each other, before anything is built."""
    from retrofit.errors import at_least_one

    at_least_one(**flags)
    if flags["top_k"] > flags["experts"]:
        raise RetrofitError(f"--top-k {flags['top_k']} exceeds --experts {flags['experts']}: a token picks at most "
                            "every expert")
    if flags["hidden_size"] % flags["heads"]:
        raise RetrofitError(f"--hidden-size {flags['hidden_size']} is not a multiple of --heads {flags['heads']}")


@app.command()
@user_errors
def finetune(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides, e.g. optim.lr=3e-4"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in "
                                                        "checkpoint.output_dir."),
):
    """Router-only fine-tuning (optionally + LoRA) of a converted model from a YAML recipe."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from retrofit.progress import PlainProgress
    from retrofit.training.recipe import load_recipe
    from retrofit.training.trainer import Finetune

    parsed, recipe_dir = load_recipe(recipe, overrides or [])
    columns = [TextColumn("step {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with err_console.status("loading model and data"):
        job = Finetune(parsed, recipe_dir, recipe.read_text(), resume=resume)
    tokens_per_step = parsed.optim.batch_size * parsed.optim.grad_accum * parsed.data.seq_len
    plain = PlainProgress(err_console, "finetune steps", parsed.optim.max_steps)  # for logs, not terminals
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("", total=parsed.optim.max_steps)
        first: dict[str, float] = {}  # step and time of the first report (a resumed run starts mid-way)

        def report(done, total, values):
            first.setdefault("step", done)
            first.setdefault("time", bar.get_time())
            steps = done - first["step"]
            rate = tokens_per_step * steps / max(bar.get_time() - first["time"], 1e-9) if steps else 0.0
            bar.update(task, completed=done, description=f"loss {values['diffusion']:.4f}  {rate:,.0f} tok/s")
            plain.update(done, f"loss {values['diffusion']:.4f}, {rate:,.0f} tok/s")

        job.progress = report
        try:
            result = job.run()
        except KeyboardInterrupt:
            raise RetrofitError(_interrupted_finetune(job.output_dir, recipe, overrides or [])) from None
    final = f": {result.steps} steps, final loss {result.losses[-1]:.4f}" if result.losses else ""
    if result.resumed_at is not None and not result.steps:
        final = f": the run had already finished its {result.resumed_at} steps; nothing trained, exported again"
    out_console.print(f"[green]wrote[/] {escape(str(result.output_dir))}{final}")


def _interrupted_finetune(output_dir: Path, recipe: Path, overrides: list[str]) -> str:
    from retrofit.training.checkpoints import latest_checkpoint

    last = latest_checkpoint(output_dir)
    if last is None:
        return "interrupted before the first checkpoint; nothing was kept"
    step = int(last.name.removeprefix("step-"))
    command = shlex.join(["retrofit", "finetune", str(recipe), *overrides, "--resume"])
    return f"interrupted; training state of step {step} is in {last}: continue with `{command}`"


@app.command()
@user_errors
@rank_zero_only
def validate(
    recipe: Path = typer.Argument(..., help="YAML recipe to check."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.sub=value overrides to apply first."),
    resume: bool = typer.Option(False, "--resume", help="Check it as `finetune --resume` would start (the "
                                                        "output directory then holds checkpoints)."),
):
    """Check a recipe without running it: everything `retrofit finetune` checks before it loads weights (schema
    and overrides, data files, the model source, its config.json against its weights, its tokenizer, the router
    against the model, seq_len, LoRA targets, the output directory). A Hub model not yet downloaded is not
    fetched: its checks wait for finetune."""
    from retrofit.training.preflight import check_recipe
    from retrofit.training.recipe import load_recipe

    parsed, recipe_dir = load_recipe(recipe, overrides or [])
    checked = check_recipe(parsed, recipe_dir, resume=resume, download=False)
    source = parsed.model.source
    route = f"{recipe}: {source} -> {parsed.checkpoint.output_dir}"
    out_console.print(f"[green]ok[/] {escape(route)}, {parsed.trainable.mode}, {parsed.optim.max_steps} steps")
    if checked.source is None:
        out_console.print(f"model.source {escape(source)} is not downloaded yet: its checks run when finetune "
                          "fetches it")


@app.command("eval")
@user_errors
@router_options
@sampler_options
def evaluate(
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated: mmlu, arc, gsm8k or any lm-eval "
                                                               "task name (or the --protocol's)."),
    protocol: Optional[str] = typer.Option(None, "--protocol", metavar="NAME", help="A published evaluation "
                                           "protocol as a preset (tasks, shots, chat template, sampler settings); "
                                           "flags given here override its values. '--protocol list' describes "
                                           "them."),
    model: str = typer.Option("llada-moe", "--model", help=f"Model directory, Hub id or registry name "
                                                          f"({_model_names()})."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N documents of each task (of each "
                                                              "subject for MMLU: 57 subjects)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    mc_num: int = typer.Option(128, "--mc-num", help="Monte-Carlo samples per likelihood request."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot examples (default: the "
                                                                          "task's; mmlu 5)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local copies of the datasets (offline)."),
    router: Optional[str] = typer.Option(None, "--router", metavar="NAME",
                                         help=f"Evaluate with another router than the checkpoint's ({_router_names()}"
                                              "); the router flags below override its settings."),
    sampler: Optional[str] = typer.Option(None, "--sampler", metavar="NAME", help="Generate with another of the "
                                          "model family's samplers (llada2.1: LLaDA2.1's token editing, for "
                                          "LLaDA2.x checkpoints); default: the checkpoint's."),
    seed: int = typer.Option(1234, "--seed", help="Seed of Monte-Carlo masks and sampling."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 on CPU, bf16 on GPU), fp32 (float32) or bf16 "
                                                      "(bfloat16), the same words as a recipe's optim.precision."),
    output: Optional[Path] = typer.Option(None, "--output", help="JSON file for scores and provenance "
                                                                 "(default: out/eval/<model>-<tasks>.json)."),
    per_subject: bool = typer.Option(False, "--per-subject", help="Show every MMLU subject in the table (the "
                                                                  "JSON file always has them)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Also write routing figures of the run "
                                 "(expert load, experts per token, ... by mask ratio, as `retrofit inspect` draws "
                                 "them) into a folder beside the JSON: <output>-routing/."),
    apply_chat_template: Optional[bool] = typer.Option(None, "--apply-chat-template/--no-apply-chat-template",
                                                       help="Write every prompt through the checkpoint's chat "
                                                            "template (its tokenizer files'), as Instruct models "
                                                            "are scored by their authors."),
    fewshot_as_multiturn: Optional[bool] = typer.Option(None, "--fewshot-as-multiturn/--no-fewshot-as-multiturn",
                                                        help="Few-shot examples as turns of the conversation "
                                                             "(default with --apply-chat-template: on, as lm-eval)."),
    system_instruction: Optional[str] = typer.Option(None, "--system-instruction", metavar="TEXT",
                                                     help="A system message before every prompt (a system turn "
                                                          "under the chat template)."),
    log_samples: bool = typer.Option(False, "--log-samples", help="Also write every document's prompt, response, "
                                     "extracted answer and score, one JSON line each: <output>-samples.jsonl."),
    write_tasks: Optional[Path] = typer.Option(None, "--write-tasks", help="Only write the offline task files "
                                               "for --tasks and --data-dir into this folder, and print the `lm_eval "
                                               "--model retrofit --include_path DIR` line that runs them on --model; "
                                               "no model is loaded."),
    router_flags: dict = None,
    sampler_options: dict = None,
):
    """Evaluate a model with lm-evaluation-harness (likelihood for MMLU/ARC, generation for GSM8K)."""
    from retrofit.eval.adapter import RetrofitLM, resolve_run
    from retrofit.eval.chat import ChatSettings
    from retrofit.eval.protocols import load_protocol
    from retrofit.eval.estimate import plan_run, total
    from retrofit.eval.runner import prepared_tasks, run_eval, write_record, write_samples
    from retrofit.io.tokenizer_files import require_chat_template
    from retrofit.errors import at_least_one
    from retrofit.eval.samplers import check_sampler_options
    from retrofit.io.writer import check_writable

    if protocol == "list":
        _print_protocols()
        return
    preset = load_protocol(protocol) if protocol else None
    chosen = dict(tasks=tasks, num_fewshot=num_fewshot, sampler=sampler, sampler_options=sampler_options,
                  apply_chat_template=bool(apply_chat_template), fewshot_as_multiturn=fewshot_as_multiturn,
                  system_instruction=system_instruction)
    if preset is not None:  # the preset's values where no flag was given
        chosen = preset.merged({**chosen, "apply_chat_template": apply_chat_template})
    tasks, num_fewshot, sampler, sampler_options = (chosen.pop(k) for k in ("tasks", "num_fewshot", "sampler",
                                                                          "sampler_options"))
    chat = ChatSettings(**chosen)
    if tasks is None:
        raise RetrofitError("--tasks is needed, e.g. --tasks gsm8k (or a published protocol: --protocol NAME; "
                            "--protocol list names them)")
    if limit is not None and limit < 1:
        raise RetrofitError(f"--limit {limit}: must be at least 1 (leave it out to evaluate every document)")
    if num_fewshot is not None and num_fewshot < 0:
        raise RetrofitError(f"--num-fewshot {num_fewshot}: must be 0 or more")
    at_least_one(mc_num=mc_num, batch_size=batch_size)  # before the tasks are indexed (seconds)
    check_sampler_options(sampler_options)
    chat.resolved()
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    if not names:
        raise RetrofitError("--tasks is empty; e.g. --tasks gsm8k or --tasks mmlu,arc")
    if write_tasks is not None:
        model_args = {**({"sampler": sampler} if sampler else {}), **({"router": router} if router else {}),
                      **sampler_options, **router_flags}
        _write_task_files(names, data_dir, write_tasks, model, model_args, _lm_eval_options(chat, num_fewshot, limit))
        return
    output = output or Path("out") / "eval" / f"{Path(model).name}-{'-'.join(names)}.json"
    check_writable(output.parent, "the results into")
    with err_console.status("checking tasks"), prepared_tasks(names, data_dir) as prepared:
        with err_console.status("counting requests"):
            if preset is not None:
                preset.check_family(_family_of_model(model))
            run = resolve_run(model, router, {**sampler_options, **router_flags}, sampler)
            if chat.apply_chat_template:
                require_chat_template(run.ckpt.path)
            plans = plan_run(run, prepared, limit, mc_num, batch_size)
        for plan in plans:  # before the load: a run that would take days can be stopped now
            err_console.print(escape(plan.describe()), highlight=False)
        err_console.print(f"in all: {total(plans).describe()}, up to {batch_size} sequences each", highlight=False)
        with err_console.status("loading model"):
            lm = RetrofitLM(model, mc_num=mc_num, batch_size=batch_size, seed=seed, router=router, dtype=dtype,
                            sampler=sampler, **sampler_options, **router_flags)
        samples = {} if log_samples else None
        record = run_eval(lm, names, limit=limit, num_fewshot=num_fewshot, data_dir=data_dir, prepared=prepared,
                          chat=chat, samples=samples)
    if record is None:  # another rank of a launched run: rank 0 holds the gathered results and writes them
        return
    if preset is not None:
        record["settings"]["protocol"] = preset.record()
    out_console.print(_results_table(record, per_subject))  # before writing: a failed write must not lose them
    if limit is not None and "mmlu" in names:
        out_console.print(f"--limit {limit} applies per MMLU subject: up to {limit} documents in each")
    write_record(record, output)
    if samples is not None:
        write_samples(samples, output.with_name(output.stem + "-samples.jsonl"))
        out_console.print(f"[green]wrote[/] {escape(str(output.with_name(output.stem + '-samples.jsonl')))}")
    if figures:
        from retrofit.inspect.gather import routing_of_evaluation
        from retrofit.inspect.report import write_inspection

        report = write_inspection(routing_of_evaluation(lm, record, names, limit, data_dir),
                                  output.with_name(output.stem + "-routing"))
        out_console.print(f"[green]wrote[/] {escape(str(report))}")
    routing = record["routing"]
    out_console.print(f"router {lm.router.describe()}: {routing['unique_experts']:.1f} unique experts per layer "
                      f"per forward, {routing['tokens_with_zero_experts']} token-layer passes with no expert")
    out_console.print(f"[green]wrote[/] {escape(str(output))}")


@app.command("inspect")
@user_errors
@one_process
@router_options
@sampler_options
def inspect_routing(
    models: Optional[list[str]] = typer.Option(None, "--model", metavar="MODEL",
                                               help=f"Model directory, Hub id or registry name ({_model_names()});"
                                               " repeat to compare models (default: tiny)."),
    routers: Optional[list[str]] = typer.Option(None, "--router", metavar="NAME",
                                                help="Route with this router instead of the checkpoint's own; "
                                                     f"repeat to compare routers on each model ({_router_names()})."),
    data: Path = typer.Option(Path("../shared/data/gsm8k/test.jsonl"), "--data",
                              help="Text to route at a sweep of mask ratios: a jsonl/json/txt/parquet/csv file."),
    fields: str = typer.Option("question,answer", "--fields", help="Text fields of --data, joined by newlines."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Instead of --data: record routing while these "
                                        "lm-eval tasks run (sampling for gsm8k, likelihood for mmlu/arc), as "
                                        "`retrofit eval` runs them; e.g. gsm8k with --data-dir."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="With --tasks: local copies of the datasets "
                                                                     "(offline)."),
    limit: int = typer.Option(64, "--limit", help="Records of --data to use; with --tasks, documents per task."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per sequence (--data)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the masks (the same positions for every model)."),
    out: Path = typer.Option(Path("out/inspect"), "--out", help="Folder for routing.json, the figures and "
                                                                "report.md."),
    router_flags: dict = None,
    sampler_options: dict = None,
):
    """Routing analytics: expert load, experts per token, tokens no expert took, capacity, unique experts and
    gate mass per layer and mask ratio, for models (or routers) side by side: routing.json, PNG figures and
    report.md. Routes --data at a sweep of mask ratios, or records while --tasks run (the sampler options apply
    there; its denoising block is also the block unique experts are counted in)."""
    from retrofit.errors import at_least_one
    from retrofit.eval.samplers import check_sampler_options
    from retrofit.inspect.gather import Subject
    from retrofit.inspect.report import write_inspection
    from retrofit.io.writer import check_writable
    from retrofit.routers.flags import settings_per_router

    if limit < 1:
        raise RetrofitError(f"--limit {limit}: must be at least 1")
    at_least_one(seq_len=seq_len)
    check_sampler_options(sampler_options)
    task_names = [t.strip() for t in (tasks or "").split(",") if t.strip()]
    if tasks is not None and not task_names:
        raise RetrofitError("--tasks is empty; e.g. --tasks gsm8k --data-dir ../shared/data")
    if not task_names and not data.is_file():
        raise RetrofitError(f"--data {data}: no such file (e.g. ../shared/data/gsm8k/test.jsonl)")
    check_writable(out, "the report into")
    subjects = [Subject(model, router) for model in models or ["tiny"]
                for router in settings_per_router(routers or [], router_flags)]
    if task_names:
        record = _inspect_tasks(subjects, task_names, limit, data_dir, {**sampler_options, "seed": seed})
    else:
        record = _inspect_sweep(subjects, data, [f.strip() for f in fields.split(",") if f.strip()], limit,
                                seq_len, seed)
    path = write_inspection(record, out)  # routing.json, the figures and report.md
    block = record["settings"]["block_length"]
    for model in record["models"]:
        layers = [layer for bucket in model["buckets"] for layer in bucket["layers"]]
        unique = sum(layer["unique_experts_per_block"] for layer in layers) / max(len(layers), 1)
        out_console.print(f"{escape(model['label'])}: {unique:.2f} unique experts per {block}-token block")
    out_console.print(f"[green]wrote[/] {escape(str(path))}")


def _inspect_sweep(subjects: list, data: Path, fields: list[str], limit: int, seq_len: int, seed: int) -> dict:
    from rich.progress import Progress

    from retrofit.inspect.gather import gather

    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task("routing forwards", total=0)

        def progress(advance: int = 0, more: int = 0) -> None:
            if more:  # each model announces its forwards once its text is tokenised
                bar.update(task, total=bar.tasks[0].total + more)
            bar.advance(task, advance)

        return gather(subjects, data, fields, limit, seq_len, seed, progress=progress)


def _inspect_tasks(subjects: list, tasks: list[str], limit: int, data_dir: Optional[Path], sampler: dict) -> dict:
    from retrofit.inspect.gather import gather_sampled

    def announce(model: str) -> None:  # the adapter draws its own progress bar per task
        err_console.print(f"running {escape(', '.join(tasks))} on {escape(model)}", highlight=False)

    return gather_sampled(subjects, tasks, limit, data_dir, sampler, announce=announce)


@app.command("study")
@user_errors
@one_process
def study(
    name: str = typer.Argument(..., metavar="NAME", help="convergence, schedules, block-tradeoff or from-scratch."),
    toy: bool = typer.Option(False, "--toy", help="A few steps and one seed, written under --work only: checks that "
                                                  "the study runs (seconds), never replaces its README."),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="Seeds per variant (default 3; 1 with --toy)."),
    model: str = typer.Option("tiny", "--model", metavar="NAME", help="The model every run starts from: tiny "
                              "(8 experts, top-2; reports in studies/NAME/) or small (64 experts, top-8, `make "
                              "small`; reports in studies/NAME/small/)."),
    studies_dir: Path = typer.Option(Path("studies"), "--studies-dir", help="Where the studies' recipes and READMEs "
                                                                           "are (run from the repository root)."),
    work: Optional[Path] = typer.Option(None, "--work", help="Run folders and results (default out/studies/NAME, "
                                                             "out/studies-toy/NAME with --toy)."),
):
    """Run one of the papers' claims as a study: every variant and seed (skipping those already complete, resuming
    an interrupted one), then the study's README.md with its table, figures and claims judged (held, did not hold,
    inconclusive), its results beside it (results.json), and the tiny vs small section of each size's README."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from retrofit.studies import STUDIES
    from retrofit.studies.base import scale
    from retrofit.studies.runner import run_study
    from retrofit.studies.models import STUDY_MODELS

    if name not in STUDIES:
        raise RetrofitError(f"unknown study {name!r}; use {', '.join(STUDIES)}")
    if seeds is not None and seeds < 1:
        raise RetrofitError(f"--seeds {seeds}: must be at least 1")
    if model not in STUDY_MODELS:
        raise RetrofitError(f"--model {model}: the studies run on {' or '.join(STUDY_MODELS)}")
    chosen = STUDIES[name]
    size = scale(toy, seeds, model)
    if model != "tiny":
        from retrofit.sources import resolve_source

        resolve_source(model)  # not built yet: said now, in one line, not in the first run
    work = work or Path(size.work_folder(chosen))
    out = work / "report" if toy else studies_dir / name / size.model.folder
    columns = [TextColumn("run {task.completed}/{task.total}"), BarColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done, total, run, detail):
            bar.update(task, completed=done, total=total, description=f"{run.id if run else ''} {detail}")

        readme = run_study(chosen, studies_dir / name, work, out, size, progress)
    out_console.print(f"[green]wrote[/] {escape(str(readme))}")


def _print_protocols() -> None:
    from retrofit.eval.protocols import describe, protocols

    for protocol in protocols():
        out_console.print("\n".join(describe(protocol)), highlight=False, markup=False, soft_wrap=True)


def _family_of_model(model: str):
    """The model family of ``--model`` from its config.json (no weights read)."""
    from retrofit.io.checkpoint import CheckpointDir
    from retrofit.io.load import checkpoint_config
    from retrofit.models import family_of
    from retrofit.sources import resolve_source

    return family_of(checkpoint_config(CheckpointDir(resolve_source(model, flag="--model").path)))


def _lm_eval_options(chat, num_fewshot: Optional[int], limit: Optional[int]) -> list[str]:
    """lm-eval's own flags for the chat settings, shots and limit of this run."""
    chat = chat.resolved()
    options = ["--num_fewshot", str(num_fewshot)] if num_fewshot is not None else []
    options += ["--limit", str(limit)] if limit is not None else []
    if chat.apply_chat_template:
        options += ["--apply_chat_template", "--fewshot_as_multiturn", str(chat.fewshot_as_multiturn).lower()]
    if chat.system_instruction is not None:
        options += ["--system_instruction", chat.system_instruction]
    return options


def _write_task_files(names: list[str], data_dir: Optional[Path], folder: Path, model: str,
                      model_args: dict | None = None, options: list[str] | None = None) -> None:
    """The offline task files, and the lm_eval line that runs them on ``model`` (--model) with this run's settings,
    as printed."""
    from retrofit.eval.tasks import expand, lm_eval_command, write_local_tasks

    if data_dir is None:
        raise RetrofitError("--write-tasks needs --data-dir: the task files point lm-eval at local data")
    folder.mkdir(parents=True, exist_ok=True)
    written = write_local_tasks(expand(names), data_dir.resolve(), folder)  # absolute: lm_eval may run elsewhere
    if not written:
        raise RetrofitError(f"no offline variant for {', '.join(names)}; offline variants exist for mmlu, arc, gsm8k")
    tasks = ",".join(written.values())
    out_console.print(f"[green]wrote[/] {escape(str(folder))}: {escape(tasks)}")
    out_console.print(f"run: {escape(lm_eval_command(model, folder, tasks, model_args, options))}", highlight=False,
                      soft_wrap=True)


def _results_table(record: dict, per_subject: bool = False) -> Table:
    table = Table(title=f"{record['model']}  ({record['router']['type']})")
    for col in ("task", "shots", "metric", "value", "stderr"):
        table.add_column(col)
    for task, metrics in record["results"].items():
        if task.startswith("mmlu_") and not per_subject:
            continue  # one MMLU row, as lm-eval's group view; --per-subject lists the 57 (and more groups)
        for metric, value in metrics.items():
            if metric.endswith("_stderr") or "_stderr[" in metric or metric == "num_fewshot":
                continue
            stderr = metrics.get(metric.replace("[", "_stderr[") if "[" in metric else metric + "_stderr")
            table.add_row(task, str(metrics.get("num_fewshot")), escape(metric), f"{value:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, float) else "")
    return table


def prepare_process() -> None:
    """Before a command runs: quiet the other ranks of a launched run, and print warnings as plain lines."""
    import logging

    from retrofit.distributed import is_main

    if not is_main():  # a launched run's other ranks compute in silence; errors still show (error_console)
        out_console.quiet = err_console.quiet = True
    log = logging.getLogger("retrofit")
    if not log.handlers:  # warnings as one plain line each, never a logging prefix or a traceback
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        log.addHandler(handler)
        log.propagate = False


@functools.cache
def _commands():
    return typer.main.get_command(app)


def command(name: str):
    """One command of the app, as the ``retrofit`` command (``retrofit_command``) runs it."""
    return _commands().get_command(None, name)
