"""The ``retrofit`` console command: lists retrofit's commands and dispatches to them without importing
``retrofit`` itself, whose package import registers its models with transformers (torch and transformers take
seconds to import). So ``retrofit --help`` answers at once; a command, or its own ``--help``, imports
``retrofit.cli`` and runs there. ``python -m retrofit`` starts here too.

It lives outside the ``retrofit`` package because importing any ``retrofit.*`` module runs the package's
``__init__``.
"""

from __future__ import annotations

import sys

from typer.core import TyperGroup

HELP = "Retrofit expert-choice (EC) or block-level routing onto token-choice diffusion-LM MoE checkpoints."

# Each command's one-line summary, in help order (a command's own --help shows its whole docstring).
COMMANDS = {
    "convert": "Load a token-choice checkpoint, swap its routers, save a complete model directory.",
    "create-tiny": "Write a tiny random model, or a full-size random one (--preset), laid out like its Hub snapshot.",
    "finetune": "Router-only fine-tuning (optionally + LoRA) of a converted model from a YAML recipe.",
    "validate": "Check a recipe without running it, as finetune checks it before loading weights.",
    "eval": "Evaluate a model with lm-evaluation-harness (likelihood for MMLU/ARC, generation for GSM8K).",
    "inspect": "Routing analytics per layer and mask ratio, for models or routers side by side.",
    "study": "Run one of the papers' claims as a study and write its README with table and figures.",
}


class LazyCommands(TyperGroup):
    """A command group that knows its commands by name and summary, and imports them only when one runs."""

    def list_commands(self, ctx) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx, name: str):
        if name not in COMMANDS:
            return None
        try:
            from retrofit import cli  # the seconds of importing torch and transformers are spent here

            cli.prepare_process()
            return cli.command(name)
        except KeyboardInterrupt:  # typer ends the process with status 130 and says nothing: say it
            print("interrupted", file=sys.stderr)
            raise

    def format_commands(self, ctx, formatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))

    def resolve_command(self, ctx, args):
        self.commands = dict.fromkeys(COMMANDS)  # only for click's "did you mean" suggestions of a typo
        try:
            return super().resolve_command(ctx, args)
        finally:
            self.commands = {}


def group() -> LazyCommands:
    return LazyCommands(name="retrofit", help=HELP, no_args_is_help=True, rich_markup_mode=None)


def main() -> None:
    try:
        group()(prog_name="retrofit")
    except KeyboardInterrupt:  # during start-up or an import, outside a command's own handling
        print("interrupted", file=sys.stderr)
        sys.exit(130)
