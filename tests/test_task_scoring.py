"""The offline task variants score exactly as lm-eval's own Hub task definitions do.

``retrofit eval --data-dir`` runs GSM8K, ARC and MMLU as variants that include lm-eval's task files and swap only
the dataset (retrofit/eval/tasks.py). A score is comparable with published ones only if the prompts, few-shot
examples, answer extraction and normalisation are lm-eval's own, so each task here runs twice on the same
documents and the same canned model outputs: as retrofit's variant, and as the Hub definition it includes. The
two must agree per document and in aggregate, and both must agree with the published scoring rules worked out
here by hand, so that two runs that drifted the same way cannot pass.

The Hub definitions run offline: lm-eval's builtin task folders are indexed as installed, and
``datasets.load_dataset`` answers their Hub datasets (openai/gsm8k, allenai/ai2_arc, cais/mmlu) with the same local
files in the Hub schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import lm_eval
import lm_eval.api.task
import numpy as np
import pytest
import yaml
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from retrofit.eval.runner import prepared_tasks
from retrofit.eval.tasks import DEFAULT_FEWSHOT, LOCAL_PREFIX, write_local_tasks

BUILTIN_TASKS = Path(lm_eval.__file__).parent / "tasks"
GSM8K_YAML = BUILTIN_TASKS / "gsm8k" / "gsm8k.yaml"
LIMIT = 20  # documents per GSM8K and ARC task
MMLU_LIMIT = 8  # documents per MMLU subject
MMLU_GROUP_SHARE = 0.02  # of each subject's documents where all 57 run: 2 to 31, so that size weighting shows
MMLU_SUBJECTS = ("abstract_algebra", "college_computer_science", "high_school_european_history")
FEWSHOT_SEED = 1234
ARC_TASKS = ("arc_challenge", "arc_easy")
MMLU_TASKS = tuple(f"mmlu_{subject}" for subject in MMLU_SUBJECTS)
TASKS = ("gsm8k", *ARC_TASKS, *MMLU_TASKS)
LOCAL_BUILDERS = ("json", "parquet", "csv")  # what the variants load their files with
INVALID = "[invalid]"  # lm-eval's regex filter's answer when nothing matches


# ------------------------------------------------------------------------------------------ canned model outputs


@dataclass(frozen=True)
class Style:
    """One way a model may state GSM8K's answer ``n``, and whether lm-eval's strict-match and flexible-extract
    filters should score it right: the styles cover every combination, so a drifted filter changes a score."""
    name: str
    write: Callable[[int], str]
    strict: bool
    flexible: bool


GSM8K_STYLES = (
    Style("worked, then ####", lambda n: f"She makes 9 * 2 = {n} dollars.\nThe answer is {n}.\n#### {n}", True, True),
    Style("#### and a full stop", lambda n: f"#### {n}.", True, True),
    Style("#### with thousands commas", lambda n: f"#### {n:,}", True, True),  # document 2's answer is 70000
    Style("prose only", lambda n: f"so she makes {n} dollars", False, True),
    Style("#### then another number", lambda n: f"#### {n}\nCheck: {n + 1} would be one too many.", True, False),
    Style("empty", lambda n: "", False, False),
    Style("wrong", lambda n: f"The answer is {n + 1}.\n#### {n + 1}", False, False),
    Style("dollars and commas, no ####", lambda n: f"She earns ${n:,} a year.", False, True),  # 17's is 57500
    Style("decimals", lambda n: f"#### {n}.00", False, False),
    Style("negated", lambda n: f"#### -{n}", False, False),
)


def gsm8k_prompt(doc: dict) -> str:
    """gsm8k.yaml's doc_to_text."""
    return f"Question: {doc['question']}\nAnswer:"


def gsm8k_answer(doc: dict) -> int:
    """The number after GSM8K's ``#### ``."""
    return int(doc["answer"].split("#### ")[-1].replace(",", ""))


def gsm8k_style(index: int) -> Style:
    return GSM8K_STYLES[index % len(GSM8K_STYLES)]


def canned_loglikelihood(context: str, continuation: str) -> float:
    """A log-probability in [-10, -1] from a hash of the request: any change to a prompt or a choice changes it,
    and it ignores length, so acc (argmax) and acc_norm (argmax per character) pick differently."""
    digest = hashlib.sha256(f"{context}\0{continuation}".encode()).digest()
    return -1.0 - 9.0 * int.from_bytes(digest[:8], "big") / 2**64


class CannedLM(LM):
    """A model whose outputs are fixed in advance: each GSM8K test document gets the style of its position in the
    test file, recognised by its prompt (an unknown prompt fails the run), and every log-likelihood request
    gets :func:`canned_loglikelihood`."""

    def __init__(self, gsm8k_docs: list[dict]) -> None:
        super().__init__()
        self._gsm8k_docs = gsm8k_docs

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        return [self._answer(request.args[0]) for request in requests]

    def _answer(self, context: str) -> str:
        for index, doc in enumerate(self._gsm8k_docs):
            if context.endswith(gsm8k_prompt(doc)):
                return gsm8k_style(index).write(gsm8k_answer(doc))
        raise AssertionError(f"no GSM8K test document ends this prompt: ...{context[-200:]!r}")

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [(canned_loglikelihood(*request.args), False) for request in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("no task here scores rolling log-likelihoods")


# ------------------------------------------------------------------------------------------ the two runs


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    with path.open() as f:
        lines = [line for line in f if line.strip()]
    return [json.loads(line) for line in lines[:limit]]


def hub_folder(data: Path, path: str, name: str | None) -> Path:
    """The local copy of the Hub dataset a builtin task asks for."""
    if path == "openai/gsm8k" and name == "main":
        return data / "gsm8k"
    if path == "allenai/ai2_arc" and name in ("ARC-Challenge", "ARC-Easy"):
        return data / "arc" / name
    if path == "cais/mmlu" and name:
        return data / "mmlu" / name
    raise AssertionError(f"a builtin task asked for the Hub dataset {path} {name}, which has no local copy here")


def offline_hub(data: Path, load_dataset: Callable) -> Callable:
    """``datasets.load_dataset`` that answers the builtin tasks' Hub datasets from ``data`` and passes the
    variants' own file loads through; nothing reaches the network."""

    def load(path, name=None, **kwargs):
        if path in LOCAL_BUILDERS:
            return load_dataset(path, name, **kwargs)
        files = {p.stem: str(p) for p in sorted(hub_folder(data, path, name).glob("*.jsonl"))}
        dataset = load_dataset("json", data_files=files)
        if path == "allenai/ai2_arc":
            # The Hub's ARC has a train split, which the 0-shot task loads as its few-shot pool and never draws
            # from; the local copy has none, so an empty one of the same schema stands in.
            dataset["train"] = dataset["test"].select([])
        return dataset

    return load


def evaluate(task: str, manager, shots: int | None, limit: int | float, gsm8k_docs: list[dict]) -> dict:
    """One task through lm-eval, as retrofit's runner calls it, with the canned model and its samples logged."""
    return lm_eval.simple_evaluate(model=CannedLM(gsm8k_docs), tasks=[task], task_manager=manager, limit=limit,
                                   num_fewshot=shots, log_samples=True, fewshot_random_seed=FEWSHOT_SEED)


def builtin_task_manager(*folders: str) -> TaskManager:
    """lm-eval's TaskManager over some of its own task folders, their YAML files as installed: indexing the whole
    tree takes about 16 s, these folders a few milliseconds."""
    return TaskManager(include_defaults=False, include_path=[str(BUILTIN_TASKS / folder) for folder in folders])


def evaluate_hub_task(task: str, manager: TaskManager, data: Path, shots: int | None, limit: int | float,
                      gsm8k_docs: list[dict]) -> dict:
    """:func:`evaluate` on a builtin task, its Hub dataset answered from ``data``."""
    datasets_module = lm_eval.api.task.datasets  # what lm-eval calls load_dataset through
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(datasets_module, "load_dataset", offline_hub(data, datasets_module.load_dataset))
        return evaluate(task, manager, shots, limit, gsm8k_docs)


@dataclass
class Pair:
    hub: dict  # simple_evaluate's output for lm-eval's own task
    offline: dict  # the same for retrofit's variant of it

    def samples(self, task: str) -> tuple[list[dict], list[dict]]:
        return self.hub["samples"][task], self.offline["samples"][LOCAL_PREFIX + task]


def user_name(task: str) -> str:
    """The name a user gives ``retrofit eval`` for an lm-eval task, which picks retrofit's default shots."""
    return "mmlu" if task.startswith("mmlu") else "arc" if task in ARC_TASKS else task


@pytest.fixture(scope="module")
def gsm8k_docs(shared_data) -> list[dict]:
    return read_jsonl(shared_data / "gsm8k" / "test.jsonl", LIMIT)


@pytest.fixture(scope="module")
def runs(shared_data, gsm8k_docs) -> dict[str, Pair]:
    """Every task run both ways, once per module, with retrofit's default shots."""
    hub_manager = builtin_task_manager("gsm8k", "arc", "mmlu/default")
    out = {}
    with pytest.MonkeyPatch.context() as patch, prepared_tasks(["gsm8k", "arc", "mmlu"], shared_data) as prepared:
        patch.setenv("HF_HUB_OFFLINE", "1")
        for task in TASKS:
            shots = DEFAULT_FEWSHOT.get(user_name(task))
            limit = MMLU_LIMIT if task in MMLU_TASKS else LIMIT
            offline = evaluate(LOCAL_PREFIX + task, prepared.manager, shots, limit, gsm8k_docs)
            hub = evaluate_hub_task(task, hub_manager, shared_data, shots, limit, gsm8k_docs)
            out[task] = Pair(hub, offline)
    return out


# ------------------------------------------------------------------------------------------ variant = Hub

# How lm-eval labels a result, not what it scored: a variant's name has the retrofit_ prefix, and an MMLU subject
# variant's alias is its task name (mmlu_anatomy) where lm-eval's is the bare subject (anatomy).
LABELS = ("name", "alias")


def metric_values(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in LABELS}


@pytest.mark.parametrize("task", TASKS)
def test_each_document_is_scored_as_the_hub_task_scores_it(runs, task):
    """Prompt, request, raw and filtered responses and per-document metrics, field by field."""
    hub, offline = runs[task].samples(task)
    assert len(offline) == len(hub) > 0
    for theirs, mine in zip(hub, offline):
        assert mine == theirs, f"{task} document {theirs['doc_id']} ({theirs.get('filter')})"


@pytest.mark.parametrize("task", TASKS)
def test_aggregate_scores_equal_the_hub_tasks(runs, task):
    """Every metric and its standard error, the sample count, and the shots."""
    pair = runs[task]
    hub = metric_values(pair.hub["results"][task])
    offline = metric_values(pair.offline["results"][LOCAL_PREFIX + task])
    assert any("_stderr," in key for key in hub)
    assert offline == hub
    assert pair.offline["n-shot"][LOCAL_PREFIX + task] == pair.hub["n-shot"][task]
    assert pair.offline["n-samples"][LOCAL_PREFIX + task] == pair.hub["n-samples"][task]


def test_every_mmlu_subject_keeps_the_hub_description(shared_data, tmp_path):
    """The variants write each subject's description themselves (their template has none); the runs above
    compare prompts for a few subjects, this compares the description of all of them."""
    write_local_tasks(["mmlu"], shared_data, tmp_path)
    variants = sorted(tmp_path.glob(f"{LOCAL_PREFIX}mmlu_*.yaml"))
    assert len(variants) == 57
    for variant in variants:
        builtin = BUILTIN_TASKS / "mmlu" / "default" / variant.name.removeprefix(LOCAL_PREFIX)
        assert yaml.safe_load(variant.read_text())["description"] == yaml.safe_load(builtin.read_text())["description"]


# ------------------------------------------------------------------------------------------ = the published rules


def regex_filter(pattern: str, group_select: int, response: str) -> str:
    """lm-eval's ``regex`` filter, written out: the ``group_select``-th match's first non-empty group, stripped."""
    matches = list(re.finditer(pattern, response))
    if not matches:
        return INVALID
    match = matches[group_select]
    found = next((group for group in match.groups() if group), None) if match.groups() else match.group(0)
    return found.strip() if found is not None else INVALID


def normalised(text: str, options: dict) -> str:
    """exact_match's normalisation: the ignored regexes removed in order, then case and punctuation."""
    for pattern in options.get("regexes_to_ignore") or []:
        text = re.sub(pattern, "", text)
    if options.get("ignore_case"):
        text = text.lower()
    if options.get("ignore_punctuation"):
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text


def gsm8k_rules() -> tuple[dict[str, tuple[str, int]], dict]:
    """From the installed gsm8k.yaml: each filter's (regex, group_select), and exact_match's options."""
    config = yaml.safe_load(GSM8K_YAML.read_text())
    filters = {}
    for entry in config["filter_list"]:
        steps = [step["function"] for step in entry["filter"]]
        assert steps == ["regex", "take_first"], f"{entry['name']}: a filter this test does not write out: {steps}"
        regex = entry["filter"][0]
        filters[entry["name"]] = (regex["regex_pattern"], regex.get("group_select", 0))
    (metric,) = config["metric_list"]
    assert metric["metric"] == "exact_match" and metric["aggregation"] == "mean"
    return filters, metric


def test_gsm8k_scores_follow_the_published_extraction_rules(runs, gsm8k_docs):
    filters, options = gsm8k_rules()
    assert set(filters) == {"strict-match", "flexible-extract"}
    pair = runs["gsm8k"]
    for samples, results in ((pair.hub["samples"]["gsm8k"], pair.hub["results"]["gsm8k"]),
                             (pair.offline["samples"][LOCAL_PREFIX + "gsm8k"],
                              pair.offline["results"][LOCAL_PREFIX + "gsm8k"])):
        for name, (pattern, group_select) in filters.items():
            scores = []
            for index, doc in enumerate(gsm8k_docs):
                (sample,) = [s for s in samples if s["doc_id"] == index and s["filter"] == name]
                response = gsm8k_style(index).write(gsm8k_answer(doc))
                extracted = regex_filter(pattern, group_select, response)
                right = normalised(extracted, options) == normalised(doc["answer"], options)
                assert sample["resps"] == [[response]] and sample["filtered_resps"] == [extracted], (name, index)
                assert sample["exact_match"] == float(right), (name, index, response)
                scores.append(float(right))
            assert results[f"exact_match,{name}"] == pytest.approx(np.mean(scores))


def test_gsm8k_styles_cover_right_and_wrong_for_both_filters(gsm8k_docs):
    """The rules, applied to the canned responses, give each style the outcome it was written for, and the
    documents include every combination: strict and flexible each right and wrong, and disagreeing both ways."""
    filters, options = gsm8k_rules()
    outcomes = set()
    for index, doc in enumerate(gsm8k_docs):
        style = gsm8k_style(index)
        response = style.write(gsm8k_answer(doc))
        strict, flexible = (normalised(regex_filter(*filters[name], response), options)
                            == normalised(doc["answer"], options) for name in ("strict-match", "flexible-extract"))
        assert (strict, flexible) == (style.strict, style.flexible), (index, style.name, response)
        outcomes.add((strict, flexible))
        if "," in response and strict:
            outcomes.add("a thousands comma ignored")
    assert outcomes == {(True, True), (True, False), (False, True), (False, False), "a thousands comma ignored"}


def arc_requests(doc: dict) -> list[tuple[str, str]]:
    """arc_easy.yaml, 0-shot: the question after "Question: ", each choice's text after a space."""
    return [(f"Question: {doc['question']}\nAnswer:", f" {text}") for text in doc["choices"]["text"]]


def mmlu_prompt(doc: dict) -> str:
    letters = "\n".join(f"{letter}. {choice}" for letter, choice in zip("ABCD", doc["choices"]))
    return f"{doc['question'].strip()}\n{letters}\nAnswer:"


def mmlu_requests(doc: dict, subject_folder: Path, shots: int) -> list[tuple[str, str]]:
    """The builtin subject's description, then the first ``shots`` dev examples (mmlu's first_n sampler), each
    answered by its letter, then the question; the choices are the letters."""
    description = yaml.safe_load((BUILTIN_TASKS / "mmlu" / "default" /
                                  f"mmlu_{subject_folder.name}.yaml").read_text())["description"]
    examples = "".join(f"{mmlu_prompt(ex)} {'ABCD'[ex['answer']]}\n\n"
                       for ex in read_jsonl(subject_folder / "dev.jsonl", shots))
    return [(description + examples + mmlu_prompt(doc), f" {letter}") for letter in "ABCD"]


def expected_choice_scores(requests: list[tuple[str, str]], choices: list[str], gold: int) -> dict[str, float]:
    """acc: the choice of highest log-likelihood is the gold one; acc_norm: the same per character of the
    choice (lm-eval 0.4's ``len(choice)``, not the bytes: that is its acc_bytes)."""
    lls = np.array([canned_loglikelihood(*request) for request in requests])
    lengths = np.array([float(len(choice)) for choice in choices])
    return {"acc": float(np.argmax(lls) == gold), "acc_norm": float(np.argmax(lls / lengths) == gold)}


def multiple_choice_expectations(task: str, data: Path, limit: int) -> list[tuple[list, dict[str, float]]]:
    """Per test document: its requests, built here from the published prompt format, and its scores."""
    out = []
    if task in ARC_TASKS:
        folder = data / "arc" / {"arc_challenge": "ARC-Challenge", "arc_easy": "ARC-Easy"}[task]
        for doc in read_jsonl(folder / "test.jsonl", limit):
            requests = arc_requests(doc)
            gold = doc["choices"]["label"].index(doc["answerKey"])
            out.append((requests, expected_choice_scores(requests, doc["choices"]["text"], gold)))
    else:
        folder = data / "mmlu" / task.removeprefix("mmlu_")
        for doc in read_jsonl(folder / "test.jsonl", limit):
            requests = mmlu_requests(doc, folder, DEFAULT_FEWSHOT["mmlu"])
            out.append((requests, expected_choice_scores(requests, list("ABCD"), doc["answer"])))
    return out


@pytest.mark.parametrize("task", ARC_TASKS + MMLU_TASKS)
def test_multiple_choice_scores_follow_the_published_rules(runs, shared_data, task):
    limit = MMLU_LIMIT if task in MMLU_TASKS else LIMIT
    expected = multiple_choice_expectations(task, shared_data, limit)
    pair = runs[task]
    for samples, results in ((pair.hub["samples"][task], pair.hub["results"][task]),
                             (pair.offline["samples"][LOCAL_PREFIX + task],
                              pair.offline["results"][LOCAL_PREFIX + task])):
        assert [s["doc_id"] for s in samples] == list(range(limit))
        metrics = [m for m in ("acc", "acc_norm") if f"{m},none" in results]
        for sample, (requests, scores) in zip(samples, expected):
            assert [tuple(a) for a in sample["arguments"]] == requests, (task, sample["doc_id"])
            assert {m: sample[m] for m in metrics} == {m: scores[m] for m in metrics}, (task, sample["doc_id"])
        for m in metrics:
            assert results[f"{m},none"] == pytest.approx(np.mean([scores[m] for _, scores in expected]))
    # Not vacuous: right and wrong documents for each metric, and (ARC) acc and acc_norm disagreeing.
    for m in metrics:
        assert {scores[m] for _, scores in expected} == {0.0, 1.0}, m
    if task in ARC_TASKS:
        assert any(scores["acc"] != scores["acc_norm"] for _, scores in expected)


@pytest.mark.slow
def test_the_mmlu_group_scores_as_the_hub_group(shared_data):
    """All 57 subjects (their prompts, few-shot examples and scores) and the group's size-weighted accuracy:
    retrofit's flat group of variants against lm-eval's mmlu, which nests the subjects in four category groups.
    A share of each subject runs, so subjects differ in size and an unweighted mean would differ. About 15 s:
    each side loads 57 datasets."""
    shots = DEFAULT_FEWSHOT["mmlu"]
    with prepared_tasks(["mmlu"], shared_data) as prepared:
        offline = evaluate(prepared.local["mmlu"], prepared.manager, shots, MMLU_GROUP_SHARE, [])
    hub = evaluate_hub_task("mmlu", builtin_task_manager("mmlu/default"), shared_data, shots, MMLU_GROUP_SHARE, [])
    subjects = sorted(folder.name for folder in (shared_data / "mmlu").iterdir() if folder.is_dir())
    assert len(subjects) == 57
    right, means = [], []
    for subject in subjects:
        task = f"mmlu_{subject}"
        assert offline["samples"][LOCAL_PREFIX + task] == hub["samples"][task], subject
        size = math.ceil(len(read_jsonl(shared_data / "mmlu" / subject / "test.jsonl")) * MMLU_GROUP_SHARE)
        subject_right = [acc["acc"] for _, acc in multiple_choice_expectations(task, shared_data, size)]
        right += subject_right
        means.append(np.mean(subject_right))
    assert metric_values(offline["results"][prepared.local["mmlu"]]) == metric_values(hub["results"]["mmlu"])
    assert hub["results"]["mmlu"]["sample_len"] == len(right)
    assert hub["results"]["mmlu"]["acc,none"] == pytest.approx(np.mean(right))
    assert np.mean(right) != pytest.approx(np.mean(means))  # so the weighting is tested
