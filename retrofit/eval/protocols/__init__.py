"""Published evaluation protocols as presets: ``retrofit eval --protocol NAME``.

A protocol is one small versioned YAML file beside this module (``<name>.yaml``), written from its source and
citing it: the tasks (lm-eval's, or the protocol's own task files in ``tasks/``), shots, chat template, sampler
settings, the scores its authors published, what the source leaves unstated and where retrofit's run differs
from theirs. Flags given on the command line override the preset's values (:meth:`Protocol.merged`).
``retrofit eval --protocol list`` prints them (:func:`protocol_table`, also the README's table).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retrofit.errors import RetrofitError
from retrofit.eval.chat import ChatSettings

PROTOCOL_DIR = Path(__file__).parent


class PublishedScore(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    checkpoint: str  # a registry name (retrofit eval --model NAME)
    task: str
    metric: str  # as retrofit's results name it, e.g. "exact_match[flexible-extract]"
    score: float  # percent, as published
    where: str  # table or page of the source


class Protocol(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int = Field(ge=1)
    title: str
    family: str  # the model family whose checkpoints it was published for
    checkpoints: list[str]
    source: list[str] = Field(min_length=1)
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    chat: ChatSettings = ChatSettings()
    sampler_name: str | None = None  # another of the family's samplers (None: the checkpoint's)
    sampler: dict[str, Any] = {}  # sampler options, named as retrofit eval's flags (dest form)
    published: list[PublishedScore] = []
    unstated: list[str] = []  # what the source does not say (retrofit's choice is in the settings above)
    differences: list[str] = []  # where retrofit's run differs from the source's

    def merged(self, given: dict[str, Any]) -> dict[str, Any]:
        """The run's settings: each of ``given`` (tasks, num_fewshot, apply_chat_template, fewshot_as_multiturn,
        system_instruction, sampler, sampler_options; None where the user gave no flag) that the user gave,
        else the preset's."""
        chat = self.chat.model_dump()
        out = {"tasks": given.get("tasks") or ",".join(self.tasks),
               "num_fewshot": self.num_fewshot if given.get("num_fewshot") is None else given["num_fewshot"],
               "sampler": given.get("sampler") or self.sampler_name,
               "sampler_options": {**self.sampler, **(given.get("sampler_options") or {})}}
        for key in chat:
            out[key] = chat[key] if given.get(key) is None else given[key]
        return out

    def check_family(self, family) -> None:
        if family.name != self.family:
            raise RetrofitError(f"protocol {self.name} was published for {self.family} checkpoints "
                                f"({', '.join(self.checkpoints)}); --model is a {family.display_name} checkpoint")

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version}


def protocol_names() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def load_protocol(name: str) -> Protocol:
    path = PROTOCOL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise RetrofitError(f"no protocol named {name!r}; choose one of {', '.join(protocol_names())} "
                            "(retrofit eval --protocol list describes them)")
    try:
        protocol = Protocol.model_validate({"name": name, **yaml.safe_load(path.read_text())})
    except ValidationError as exc:  # a shipped file: a defect, said in one line
        err = exc.errors()[0]
        raise RetrofitError(f"protocol file {path}: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    return protocol


def protocols() -> list[Protocol]:
    return [load_protocol(name) for name in protocol_names()]


def protocol_table() -> str:
    """Markdown: each published score beside the preset and the command that sets its protocol up."""
    lines = ["| checkpoint | protocol | task | metric | published | command |", "|---|---|---|---|---|---|"]
    for protocol in protocols():
        for score in protocol.published:
            command = f"retrofit eval --model {score.checkpoint} --protocol {protocol.name}"
            lines.append(f"| {score.checkpoint} | {protocol.name} v{protocol.version} | {score.task} | "
                         f"{score.metric} | {score.score:g} ({score.where}) | `{command}` |")
        if not protocol.published:
            command = f"retrofit eval --model {protocol.checkpoints[0]} --protocol {protocol.name}"
            lines.append(f"| {protocol.checkpoints[0]} | {protocol.name} v{protocol.version} | "
                         f"{', '.join(protocol.tasks)} | — | none published | `{command}` |")
    return "\n".join(lines)


def describe(protocol: Protocol) -> list[str]:
    """The lines ``retrofit eval --protocol list`` prints for one protocol."""
    chat = protocol.chat.resolved()
    settings = ", ".join(f"{k.replace('_', '-')} {v}" for k, v in protocol.sampler.items())
    lines = [f"{protocol.name} (v{protocol.version}): {protocol.title}",
             f"  for {', '.join(protocol.checkpoints)}; tasks {', '.join(protocol.tasks)}, "
             f"{'default' if protocol.num_fewshot is None else protocol.num_fewshot} shots, chat template "
             f"{'on' + (', few-shot as turns' if chat.fewshot_as_multiturn else '') if chat.apply_chat_template else 'off'}",
             f"  sampler{' ' + protocol.sampler_name if protocol.sampler_name else ''}: {settings or 'defaults'}"]
    lines += [f"  published: {s.checkpoint} {s.task} {s.metric} {s.score:g} ({s.where})" for s in protocol.published]
    lines += [f"  unstated: {u}" for u in protocol.unstated]
    lines += [f"  differs: {d}" for d in protocol.differences]
    lines += [f"  source: {s}" for s in protocol.source]
    return lines
