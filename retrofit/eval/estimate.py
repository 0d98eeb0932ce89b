"""What an evaluation will run, counted before a model is loaded: each task's requests (built by lm-eval as the
run will build them), and the forwards they take with the chosen batch size, Monte-Carlo samples and sampler.
The counts need only the tokenizer; a benchmark turns them into time (``make bench-eval``: seconds per forward
of each kind, measured, times these counts).

Forwards by request type (``retrofit.eval.adapter``): a likelihood request with a one-token continuation is one
row, shared by the requests with the same context; any other is ``mc_num`` sample rows and a greedy row; rows
share forwards ``batch_size`` at a time. A generation batch of ``batch_size`` prompts takes the sampler's steps
(:meth:`~retrofit.eval.sampler_base.Sampler.forwards`): full forwards, and cached block-only ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from retrofit.eval.sampler_base import Forwards


KIND_NAMES = {"loglikelihood": "likelihood", "generate_until": "generation", "loglikelihood_rolling": "rolling"}


@dataclass
class TaskPlan:
    name: str
    requests: dict[str, int] = field(default_factory=dict)  # per request type
    rows: int = 0  # likelihood rows
    generation_batches: int = 0
    forwards: Forwards = field(default_factory=Forwards)
    unknown: bool = False  # the sampler does not say how many forwards a generation takes

    def describe(self) -> str:
        kinds = ", ".join(f"{n:,} {KIND_NAMES.get(kind, kind)}" for kind, n in self.requests.items())
        forwards = self.forwards.describe() + (" and the generations'" if self.unknown else "")
        return f"{self.name}: {kinds} requests → {forwards}"


@dataclass(frozen=True)
class Request:
    """What counting a request needs: its type, the document whose context it has, its continuation."""

    kind: str
    document: tuple | None = None
    continuation: str | None = None


def plan_task(name: str, requests: list[Request], tokenizer, sampler, mc_num: int, batch_size: int) -> TaskPlan:
    """Count the forwards of one task's requests."""
    plan = TaskPlan(name)
    single_contexts, generations = set(), 0
    for request in requests:
        plan.requests[request.kind] = plan.requests.get(request.kind, 0) + 1
        if request.kind == "loglikelihood":
            # Tokenised alone, not after its context: a merge across the boundary is rare, and tokenising every
            # few-shot context would cost as long as lm-eval's building them (minutes for MMLU).
            if len(tokenizer(request.continuation)["input_ids"]) == 1:
                single_contexts.add(request.document)
            else:
                plan.rows += mc_num + 1
        elif request.kind == "loglikelihood_rolling":
            plan.rows += mc_num
        elif request.kind == "generate_until":
            generations += 1
    plan.rows += len(single_contexts)
    plan.generation_batches = -(-generations // batch_size)
    known = sampler.forwards()
    per_batch = known or Forwards()
    plan.unknown = bool(generations) and known is None
    plan.forwards = Forwards(full=-(-plan.rows // batch_size) + plan.generation_batches * per_batch.full,
                             cached=plan.generation_batches * per_batch.cached,
                             at_most=per_batch.at_most and generations > 0)
    return plan


def task_requests(prepared, user_name: str, limit: int | None) -> list[Request]:
    """The requests lm-eval will make for ``user_name`` (every subtask of a group), from its documents and their
    answer choices: the few-shot contexts are not built (a one-token continuation shares its document's
    context, whatever the shots)."""
    from lm_eval.evaluator_utils import get_sample_size

    loaded = prepared.manager.load_ahead([prepared.local.get(user_name, user_name)])  # the run takes them over
    requests = []
    for task_name, task in loaded["tasks"].items():
        kind = task.get_config("output_type")
        delimiter = task.get_config("target_delimiter")
        delimiter = " " if delimiter is None else delimiter
        docs = list(task.eval_docs)
        count = get_sample_size(task, limit)
        for i, doc in enumerate(docs if count is None else docs[:count]):
            if kind == "multiple_choice":
                requests += [Request("loglikelihood", (task_name, i), delimiter + str(choice))
                             for choice in task.doc_to_choice(doc)]
            elif kind == "loglikelihood":
                requests.append(Request("loglikelihood", (task_name, i), delimiter + str(task.doc_to_target(doc))))
            else:
                requests.append(Request(kind))
    return requests


def plan_run(run, prepared, limit: int | None, mc_num: int, batch_size: int) -> list[TaskPlan]:
    """Every task's plan for ``retrofit eval``, from the run's settings (:func:`retrofit.eval.adapter.resolve_run`:
    config.json and the tokenizer are read, not the weights). Few-shot examples change no count (they are in
    every context). A task lm-eval cannot read fails here as it would in the run, in one line."""
    from retrofit.errors import RetrofitError
    from retrofit.eval.runner import lm_eval_failure
    from retrofit.io.tokenizer_files import load_tokenizer

    tokenizer = load_tokenizer(run.ckpt.path)
    plans = []
    for name in prepared.names:
        try:
            requests = task_requests(prepared, name, limit)
        except RetrofitError:
            raise
        except Exception as exc:  # lm-eval's own (a dataset it cannot reach): the run's message, earlier
            raise lm_eval_failure(name, exc) from None
        plans.append(plan_task(name, requests, tokenizer, run.sampler, mc_num, batch_size))
    return plans


def total(plans: list[TaskPlan]) -> Forwards:
    return Forwards(sum(p.forwards.full for p in plans), sum(p.forwards.cached for p in plans),
                    any(p.forwards.at_most for p in plans))
