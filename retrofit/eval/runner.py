"""`retrofit eval`: run lm-eval tasks on a retrofit model and record exactly what produced the scores."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from retrofit.errors import RetrofitError
from retrofit.eval.chat import ChatSettings
from retrofit.eval.tasks import DEFAULT_FEWSHOT, LOCAL_PREFIX, PROTOCOL_TASK_DIR, expand, write_local_tasks
from retrofit.io.paths import cache_dir
from retrofit.io.writer import atomic_file


HASH_CACHE = "weights-sha256.json"


def weights_hash(directory: Path) -> str:
    """sha256 over the shards' names and their own sha256s, so a result names the exact weights it came from.
    Each file's hash is cached under its device, inode, size and modification time: a file that has not
    changed is not read again (re-reading 15 GB cost 22-27 s per evaluation of LLaDA-MoE-7B), and hard links
    to one file share one entry."""
    cache_path = cache_dir() / HASH_CACHE
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digest, learned = hashlib.sha256(), False
    for path in sorted(directory.glob("*.safetensors")):
        if path.name == "router.safetensors":
            continue  # a copy of tensors already in the shards
        st = path.stat()
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
        if key not in cache:
            cache[key], learned = _file_sha256(path), True
        digest.update(path.name.encode() + b"\0" + cache[key].encode())
    if learned:
        _save_hash_cache(cache_path, cache)
    return digest.hexdigest()


def _save_hash_cache(cache_path: Path, cache: dict) -> None:
    try:
        with atomic_file(cache_path) as tmp:
            tmp.write_text(json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs the re-hash next time


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


class ReusingTaskManager:
    """lm-eval's TaskManager, except that a task list loaded ahead (for the run's plan, :mod:`retrofit.eval.estimate`)
    is handed to the run instead of loaded again: MMLU's 57 subjects take seconds to load. Each list loaded
    ahead is handed over once (the run changes the tasks it gets: shots, requests)."""

    def __init__(self, manager) -> None:
        self._manager = manager
        self._ahead: dict[tuple, dict] = {}

    def load_ahead(self, tasks: list[str]) -> dict:
        self._ahead[tuple(tasks)] = loaded = self._manager.load(tasks)
        return loaded

    def load(self, tasks):
        return self._ahead.pop(tuple(tasks), None) or self._manager.load(tasks)

    def __getattr__(self, name):
        return getattr(self._manager, name)


@dataclass
class PreparedTasks:
    names: list[str]  # lm-eval task names the user's names expand to
    local: dict[str, str]  # lm-eval task name -> its offline variant
    manager: ReusingTaskManager  # lm-eval's TaskManager that knows them all


@contextmanager
def prepared_tasks(tasks: list[str], data_dir: Path | None = None) -> Iterator[PreparedTasks]:
    """Resolve task names (writing offline variants for ``data_dir``) and refuse unknown ones: done before a
    model is loaded, so a misspelt task costs seconds, not a 7B load."""
    from lm_eval.tasks import TaskManager

    names = expand(tasks)
    with tempfile.TemporaryDirectory(prefix="retrofit-tasks-") as workdir:
        local = write_local_tasks(names, Path(data_dir), Path(workdir)) if data_dir else {}
        # Indexing lm-eval's own task tree parses thousands of YAML files (about 16 s here); the local variants
        # name their templates by path, so the index is built only when a task is not a local variant.
        # The protocols' own task files are known too (read from the Hub when no --data-dir gives them).
        paths = [str(PROTOCOL_TASK_DIR), *([workdir] if local else [])]
        manager = ReusingTaskManager(TaskManager(include_path=paths,
                                                 include_defaults=any(name not in local for name in names)))
        known = set(manager.all_tasks)
        for name in names:
            if local.get(name, name) not in known:
                raise RetrofitError(f"unknown task {name!r}; use mmlu, arc, gsm8k or an lm-eval task name")
        yield PreparedTasks(names, local, manager)


def run_eval(lm, tasks: list[str], limit: int | None = None, num_fewshot: int | None = None,
             data_dir: Path | None = None, prepared: PreparedTasks | None = None, chat: ChatSettings | None = None,
             samples: dict | None = None) -> dict | None:
    """Evaluate ``lm`` (a RetrofitLM) on ``tasks`` (user names); returns the JSON-ready record, on rank 0 only
    when several processes share the requests (None elsewhere). ``samples``, where given, receives each task's
    logged documents (prompt, response, filtered answer, scores), as lm-eval's ``--log_samples``."""
    chat = chat or ChatSettings()
    if prepared is None:
        with prepared_tasks(tasks, data_dir) as prepared:
            return run_eval(lm, tasks, limit, num_fewshot, data_dir, prepared, chat, samples)
    import datasets

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    logging.getLogger("lm_eval.evaluator").addFilter(_asked_for_fewshot)
    datasets.disable_progress_bars()
    record_tasks = {}
    with _fewshot_as_one_process(lm.rank, lm.world_size), _quiet_lm_eval():
        for user_name in prepared.names:
            out = _run_task(lm, user_name, prepared, num_fewshot, limit, chat, samples is not None)
            if out is not None:  # lm-eval returns the gathered results on rank 0 only
                record_tasks.update(_scores(out["results"], out.get("n-shot", {})))
                if samples is not None:
                    samples.update({k.removeprefix(LOCAL_PREFIX): v for k, v in out.get("samples", {}).items()})
    lm.gather_routing()
    if lm.rank != 0:
        return None
    return _record(lm, record_tasks, limit, num_fewshot, data_dir, chat)


def _run_task(lm, user_name: str, prepared: PreparedTasks, num_fewshot, limit, chat: ChatSettings,
              log_samples: bool) -> dict | None:
    """One task through lm-eval: its output (None on ranks other than 0)."""
    import lm_eval

    task = prepared.local.get(user_name, user_name)
    shots = num_fewshot if num_fewshot is not None else DEFAULT_FEWSHOT.get(user_name)
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=shots, limit=limit,
                                       task_manager=prepared.manager, log_samples=log_samples,
                                       bootstrap_iters=1000, **chat.evaluate_arguments())
    except RetrofitError:
        raise
    except Exception as exc:
        raise lm_eval_failure(user_name, exc) from None


def lm_eval_failure(task: str, exc: Exception) -> RetrofitError:
    """lm-eval's own exception on ``task`` as one line; a dataset it could not reach gets the offline hint."""
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    hint = ("; offline, give --data-dir with local copies of the datasets (e.g. ../shared/data)"
            if "Couldn't reach" in first or isinstance(exc, ConnectionError) else "")
    return RetrofitError(f"lm-eval failed on {task}: {type(exc).__name__}: {first}{hint}")


@contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval draws a "building contexts" bar for every task it prepares (one line each in a log: 57 for MMLU)
    and asks git for the working directory's commit, whose "fatal: not a git repository" reaches the user's
    stderr; retrofit draws its own progress per task and records its own provenance, so both are silenced."""
    import functools
    import subprocess

    import lm_eval.api.task as task_module
    import lm_eval.evaluator as evaluator

    def commit_of_working_directory() -> str | None:
        try:
            return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True).stdout.strip() \
                or None
        except OSError:  # no git
            return None

    bar, commit = task_module.tqdm, evaluator.get_git_commit_hash
    task_module.tqdm = functools.partial(bar, disable=True)
    evaluator.get_git_commit_hash = commit_of_working_directory
    try:
        yield
    finally:
        task_module.tqdm, evaluator.get_git_commit_hash = bar, commit


@contextmanager
def _fewshot_as_one_process(rank: int, world_size: int) -> Iterator[None]:
    """lm-eval's data-parallel path builds each rank's requests from its own share of the documents, drawing the
    few-shot examples from one random stream as it goes, so a document gets other examples with 2 processes than
    with 1 (lm-eval issue #1308; MMLU and GSM8K are 5-shot). Here every rank builds the requests of all documents
    as one process would, then keeps its own share (the documents lm-eval gives it: index ≡ rank mod world
    size); the split, padding and gathering stay lm-eval's."""
    if world_size <= 1:
        yield
        return
    from lm_eval.api.task import Task

    original = Task.build_all_requests

    def build_all_requests(self, *args, rank: int = 0, world_size: int = 1, **kwargs):
        original(self, *args, rank=0, world_size=1, **kwargs)
        self._instances = [i for i in self._instances if i.doc_id % world_size == rank]

    Task.build_all_requests = build_all_requests
    try:
        yield
    finally:
        Task.build_all_requests = original


def _record(lm, record_tasks: dict, limit, num_fewshot, data_dir, chat: ChatSettings) -> dict:
    import lm_eval

    return {
        "model": str(lm.path),
        "weights_sha256": weights_hash(lm.path),
        "router": lm.router.model_dump(),
        "lm_eval_version": lm_eval.__version__,
        "settings": {"processes": lm.world_size, "mc_num": lm.mc_num, "batch_size": lm.batch_size_, "seed": lm.seed, "limit": limit,
                     "num_fewshot": num_fewshot, "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                     "chat": chat.resolved().model_dump(),
                     "sampler": {"name": lm.sampler.name, **lm.sampler.settings.__dict__}},
        "results": record_tasks,
        "routing": lm.routing_report(),
    }


def _asked_for_fewshot(record: logging.LogRecord) -> bool:
    """lm-eval warns once per subtask (57 lines for MMLU) that the shots asked for replace the task's default:
    that is what was asked, and the record stores it."""
    return not record.getMessage().startswith("Overwriting default num_fewshot")


def _scores(results: dict, shots: dict) -> dict:
    """lm-eval's per-task results → {task: {metric: value, metric_stderr: value, num_fewshot}}."""
    out = {}
    for task, metrics in results.items():
        name = task.removeprefix(LOCAL_PREFIX)
        entry = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, _, flt = key.partition(",")
            label = metric if flt == "none" else f"{metric}[{flt}]"
            entry[label] = value
        if task in shots:
            entry["num_fewshot"] = shots[task]
        out[name] = entry
    return out


def write_samples(samples: dict, output: Path) -> None:
    """The logged documents, one JSON line each with its task's name, beside the results (lm-eval's own
    serialiser for what JSON cannot hold)."""
    from lm_eval.utils import handle_non_serializable

    try:
        with atomic_file(output) as tmp:
            with tmp.open("w") as f:
                for task, docs in samples.items():
                    for doc in docs:
                        f.write(json.dumps({"task": task, **doc}, default=handle_non_serializable) + "\n")
    except OSError as exc:
        raise RetrofitError(f"cannot write the samples to {output}: {exc.strerror}") from None


def write_record(record: dict, output: Path) -> None:
    # Never into the model directory by default (the caller's choice): it may be a read-only Hub cache snapshot.
    try:
        with atomic_file(output) as tmp:
            tmp.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as exc:
        raise RetrofitError(f"cannot write the results to {output}: {exc.strerror}; "
                            "the table above holds them") from None
