"""Task names and the offline task variants behind ``--data-dir``.

``mmlu`` → mmlu (5-shot by default, as LLaDA reports), ``arc`` → arc_challenge + arc_easy, ``gsm8k`` →
gsm8k; any other lm-eval task name passes through. With ``--data-dir``, each of these runs as a variant whose
YAML *includes lm-eval's own task file* (same prompts, few-shot sampling, filters and metrics) and only swaps
the dataset for local files in the Hub dataset's schema:

- ``gsm8k/{train,test}.jsonl`` (question, answer), as in ``../shared/data``;
- ``arc/ARC-Challenge/…`` and ``arc/ARC-Easy/…`` (id, question, choices{text,label}, answerKey);
- ``mmlu/<subject>/…`` or ``mmlu/all/…`` (question, subject, choices, answer), splits test and dev.

A split is any file named ``<split>.<ext>`` or ``<split>-*.<ext>`` (jsonl, json, parquet, csv) under the
dataset's folder, which covers both flat copies and Hub snapshot layouts.

The tasks of the published evaluation protocols (:mod:`retrofit.eval.protocols`, e.g. dInfer's
``gsm8k_llada_moe``) ship as task files of their own in ``protocols/tasks/``; they read the same datasets, so they
get offline variants the same way (``PROTOCOL_TASKS``: task name → the dataset it reads).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from retrofit.errors import RetrofitError

ALIASES = {"mmlu": ["mmlu"], "arc": ["arc_challenge", "arc_easy"], "gsm8k": ["gsm8k"]}
DEFAULT_FEWSHOT = {"mmlu": 5}
LOCAL_PREFIX = "retrofit_"
_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_ARC_FOLDERS = {"arc_challenge": "ARC-Challenge", "arc_easy": "ARC-Easy"}
PROTOCOL_TASK_DIR = Path(__file__).parent / "protocols" / "tasks"
# The protocols' own task files (task name → the dataset it reads, named as lm-eval's own task of it).
PROTOCOL_TASKS = {"gsm8k_llada_moe": "gsm8k", "gsm8k_dmoe": "gsm8k", "arc_challenge_dmoe": "arc_challenge"}


def expand(names: list[str]) -> list[str]:
    """User task names → lm-eval task names, in order, without duplicates."""
    out: list[str] = []
    for name in names:
        for task in ALIASES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def builtin_task_file(*parts: str) -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / Path(*parts)
    if not path.is_file():
        raise RetrofitError(f"this lm-eval version has no {'/'.join(parts)}; install lm-eval 0.4.x")
    return path


def split_files(folder: Path, split: str) -> list[str]:
    found = []
    for ext in _EXTENSIONS:
        found += sorted(str(p) for p in folder.rglob(f"{split}{ext}"))
        found += sorted(str(p) for p in folder.rglob(f"{split}-*{ext}"))
    return found


def _empty(path: Path) -> bool:
    """No bytes, or (a text format) nothing but blank lines."""
    if path.stat().st_size == 0:
        return True
    if path.suffix in (".jsonl", ".json", ".csv") and path.stat().st_size < 4096:
        return not path.read_bytes().strip()
    return False


def _variant(name: str, include: Path, folder: Path, splits: dict[str, str], extra: dict | None = None) -> dict:
    files = {}
    for split in splits.values():
        paths = split_files(folder, split)
        if paths:
            files[split] = paths
    if "test" not in files:
        raise RetrofitError(f"no test split for {name} under {folder} (expected test.jsonl, test-*.parquet, …)")
    for split, paths in files.items():
        for path in paths:
            if _empty(Path(path)):
                raise RetrofitError(f"{path} is empty: the {split} split of {name} needs at least one document")
    builder = {_EXTENSIONS[Path(p).suffix] for paths in files.values() for p in paths}
    if len(builder) != 1:
        raise RetrofitError(f"{folder}: mixed file formats {sorted(builder)}; keep one format per dataset")
    config = {"include": str(include), "task": LOCAL_PREFIX + name, "task_alias": name,
              "dataset_path": builder.pop(), "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    for role, split in splits.items():
        config[role] = split if split in files else None
    config.update(extra or {})
    return config


def protocol_task_file(task: str) -> Path:
    return PROTOCOL_TASK_DIR / f"{task}.yaml"


def _gsm8k(data_dir: Path, task: str = "gsm8k", include: Path | None = None) -> list[dict]:
    return [_variant(task, include or builtin_task_file("gsm8k", "gsm8k.yaml"), data_dir / "gsm8k",
                     {"training_split": "train", "fewshot_split": "train", "test_split": "test"},
                     {"tag": []})]


def _arc(dataset: str, data_dir: Path, task: str | None = None, include: Path | None = None) -> list[dict]:
    folder = next((d / _ARC_FOLDERS[dataset] for d in (data_dir / "arc", data_dir / "ai2_arc")
                   if (d / _ARC_FOLDERS[dataset]).is_dir()), data_dir / "arc" / _ARC_FOLDERS[dataset])
    if not folder.is_dir():
        raise RetrofitError(f"no local data for {task or dataset}: expected {folder} (train/validation/test files "
                            "in the allenai/ai2_arc schema); leave arc out of --tasks, or drop --data-dir to read "
                            "the Hub")
    return [_variant(task or dataset, include or builtin_task_file("arc", f"{dataset}.yaml"), folder,
                     {"training_split": "train", "validation_split": "validation", "test_split": "test"},
                     {"tag": []})]


def _mmlu(data_dir: Path) -> list[dict]:
    root = data_dir / "mmlu"
    if not root.is_dir():
        raise RetrofitError(f"no local data for mmlu: expected {root} (<subject>/test and dev files in the "
                            "cais/mmlu schema); leave mmlu out of --tasks, or drop --data-dir to read the Hub")
    template = builtin_task_file("mmlu", "default", "_default_template_yaml")
    subjects = sorted(d.name for d in root.iterdir() if d.is_dir() and split_files(d, "test") and d.name != "all")
    configs = []
    for subject in subjects:
        configs.append(_variant(f"mmlu_{subject}", template, root / subject, {"test_split": "test",
                                                                              "fewshot_split": "dev"}, {
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n"}))
    if not configs:  # one combined copy: filter it by subject at load time is lm-eval's job; run it whole
        configs.append(_variant("mmlu", template, root, {"test_split": "test", "fewshot_split": "dev"}))
        return configs
    configs.append({"group": LOCAL_PREFIX + "mmlu", "group_alias": "mmlu",
                    "task": [c["task"] for c in configs],
                    "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}]})
    return configs


def write_local_tasks(tasks: list[str], data_dir: Path, workdir: Path) -> dict[str, str]:
    """Write offline variants of ``tasks`` into ``workdir``; returns lm-eval task name → local task name.
    Tasks without an offline variant are left to lm-eval (and the Hub)."""
    if not data_dir.is_dir():
        raise RetrofitError(f"--data-dir {data_dir} is not a directory")
    mapping = {}
    for task in tasks:
        if task == "gsm8k":
            configs = _gsm8k(data_dir)
        elif task in _ARC_FOLDERS:
            configs = _arc(task, data_dir)
        elif task == "mmlu":
            configs = _mmlu(data_dir)
        elif PROTOCOL_TASKS.get(task) == "gsm8k":
            configs = _gsm8k(data_dir, task, protocol_task_file(task))
        elif PROTOCOL_TASKS.get(task) in _ARC_FOLDERS:
            configs = _arc(PROTOCOL_TASKS[task], data_dir, task, protocol_task_file(task))
        else:
            continue
        for config in configs:
            name = config.get("group") or config["task"]
            (workdir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        mapping[task] = configs[-1].get("group") or configs[-1]["task"]
    return mapping


def lm_eval_command(model: str, folder: Path, tasks: str, model_args: dict | None = None,
                    options: list[str] | None = None) -> str:
    """The ``lm_eval`` command line that runs the task files written into ``folder`` on ``model``, quoted for a
    shell: what ``retrofit eval --write-tasks`` prints (a test runs it as printed). ``model_args``: the sampler and
    router options (``key=value`` after ``pretrained``); ``options``: lm-eval's own flags (chat template, shots)."""
    import shlex

    args = ",".join([f"pretrained={model}", *(f"{k}={v}" for k, v in (model_args or {}).items())])
    return shlex.join(["lm_eval", "--model", "retrofit", "--model_args", args, "--include_path", str(folder),
                       "--tasks", tasks, *(options or [])])
