"""dMoE's zero-shot prompts and answer extraction (protocol dmoe-zeroshot-cot), for lm-eval task files.

Written from fscdc/dMoE @ a5b7679: ``evaluations/evaluation/gsm8k/prompt.py`` and ``eval_gsm8k.py``
(``extract_boxed_text``, ``process_target``, ``evaluation``; ``--relax`` off, as its scripts run it),
``evaluations/evaluation/arc/prompt.py`` and ``eval_arc.py`` (``extract_answer_arc``, ``normalize_answer_key``).
Two scores per document, as dMoE reports: strict (GSM8K: the number in the last ``\\boxed{}``; ARC: a boxed
letter, an "Answer:" tag or an explicit phrase) and soft (any of dMoE's fallbacks). The paper does not say which
of the two its tables give.
"""

from __future__ import annotations

import re

_BOXED = r"\\boxed\{([^}]*)\}"


def gsm8k_prompt(doc: dict) -> str:
    return f"Please answer the question step by step and put the answer in \\boxed{{}}. {doc['question']}"


def gsm8k_answers(text: str) -> tuple[list[str], list[str] | None]:
    """(strict, flexible) candidates: strict the numbers inside the last \\boxed{} (none without one); flexible
    the last number of the text, or the strict numbers when there is exactly one \\boxed{}."""
    boxed = re.findall(_BOXED, text)
    numbers = re.findall(r"\b\d+\.?\d*\b", text)
    flexible = [numbers[-1]] if numbers else None
    strict = re.findall(r"[\d.]+", boxed[-1]) if boxed else []
    if len(boxed) == 1:
        flexible = strict
    return strict, flexible


def gsm8k_results(doc: dict, results: list[str]) -> dict[str, int]:
    target = float(int(doc["answer"].split("#### ")[-1].replace(",", "")))
    strict, flexible = gsm8k_answers(results[0])
    right_strict = right_soft = 0
    try:  # dMoE counts a candidate that is no number ("1.2.3") as wrong
        if strict and float(strict[0]) == target:
            right_strict = right_soft = 1
        elif flexible and float(flexible[0]) == target:
            right_soft = 1
    except ValueError:
        pass
    return {"strict_accuracy": right_strict, "soft_accuracy": right_soft}


_ARC_PROMPT = ("Answer the following multiple choice question. Think step by step and then give the final answer of "
               "the following format: \\boxed{{$LETTER}} where LETTER is one of ABCD.\n\n{question}\n\n"
               "A) {A}\nB) {B}\nC) {C}\nD) {D}")


def arc_prompt(doc: dict) -> str:
    """Four options always: fewer choices are padded with "NA"; a fifth is dropped, as in dMoE's prompt."""
    choices = list(doc["choices"]["text"]) + ["NA"] * (4 - len(doc["choices"]["text"]))
    return _ARC_PROMPT.format(question=doc["question"], A=choices[0], B=choices[1], C=choices[2], D=choices[3])


_EXPLICIT = [r"(?i)(?:the\s+)?correct\s+answer\s+is\s*:?\s*\**([A-D])\b",
             r"(?i)(?:the\s+)?answer\s+is\s*:?\s*\**([A-D])\b",
             r"(?i)(?:so|thus|therefore)[,\s]+(?:the\s+)?(?:correct\s+)?answer\s+is\s*:?\s*\**([A-D])\b",
             r"(?i)I\s+(?:would\s+)?(?:choose|select|pick)\s+:?\s*\**([A-D])\b"]
_WEAK = [r"(?i)is\s+option\s*:?\s*([A-D])\b", r"(?i)\*\*Answer:\*\*\s*([A-D])\b", r"(?i)Option\s+([A-D])\b",
         r"\(([A-D])\)", r"(?i)\b([A-D])\s+is\s+(?:correct|right)\b"]
STRICT_KINDS = ("boxed", "answer_tag", "explicit")


def arc_answer(text: str) -> tuple[str | None, str | None]:
    """(letter, how it was found), dMoE's cascade: a letter in the first \\boxed{}, the last "Answer: X", the last
    explicit phrase (patterns in order), the last weaker pattern, the last standalone A-D; (None, None) if none."""
    boxed = re.search(_BOXED, text)
    if boxed:
        letter = re.search(r"\b([ABCD])\b", boxed.group(1))
        if letter:
            return letter.group(1).upper(), "boxed"
    tags = re.findall(r"(?i)Answer\s*:\s*\**\s*([A-D])\b", text)
    if tags:
        return tags[-1].upper(), "answer_tag"
    for kind, patterns in (("explicit", _EXPLICIT), ("pattern", _WEAK)):
        for pattern in patterns:
            found = re.findall(pattern, text)
            if found:
                return found[-1].upper(), kind
    letters = re.findall(r"\b([A-D])\b", text)
    return (letters[-1].upper(), "last_letter") if letters else (None, None)


def arc_results(doc: dict, results: list[str]) -> dict[str, int]:
    target = {"1": "A", "2": "B", "3": "C", "4": "D"}.get(str(doc["answerKey"]), str(doc["answerKey"])).upper()
    letter, kind = arc_answer(str(results[0]))
    right = int(letter is not None and letter == target)
    return {"strict_accuracy": right if kind in STRICT_KINDS else 0, "soft_accuracy": right}
