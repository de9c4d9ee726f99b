"""Write the paper's zero-shot evaluation sets as local multiple-choice JSONL for ``tclora``.

ARC-challenge, ARC-easy, BoolQ, HellaSwag, OpenBookQA, PIQA and WinoGrande are read through
``datasets`` (``pip install datasets``; needs the hub or a warm cache) and written as
``{"prompt": str, "choices": [str, ...], "answer": int}`` lines (the form
``tclora.evaluation.load_eval_set`` reads), with lm-evaluation-harness' zero-shot prompts.
WinoGrande is scored the harness way only approximately: the harness conditions each option on
its own partial sentence; here the sentence with a blank is the prompt and the options are the
choices.

Usage::

    python benchmarks/paper_eval_sets.py --out data/paper_eval   # used by configs/*_flan.yaml
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tclora._io import atomic_write_text

Record = dict[str, Any]


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def arc(row: Mapping[str, Any]) -> Record:
    labels = list(row["choices"]["label"])
    return {
        "prompt": f"Question: {row['question']}\nAnswer:",
        "choices": list(row["choices"]["text"]),
        "answer": labels.index(row["answerKey"]),
    }


def boolq(row: Mapping[str, Any]) -> Record:
    return {
        "prompt": f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "answer": int(bool(row["answer"])),
    }


def hellaswag(row: Mapping[str, Any]) -> Record:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return {
        "prompt": _hellaswag_text(row["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_text(e) for e in row["endings"]],
        "answer": int(row["label"]),
    }


def openbookqa(row: Mapping[str, Any]) -> Record:
    labels = list(row["choices"]["label"])
    return {
        "prompt": row["question_stem"],
        "choices": list(row["choices"]["text"]),
        "answer": labels.index(row["answerKey"]),
    }


def piqa(row: Mapping[str, Any]) -> Record:
    return {
        "prompt": f"Question: {row['goal']}\nAnswer:",
        "choices": [row["sol1"], row["sol2"]],
        "answer": int(row["label"]),
    }


def winogrande(row: Mapping[str, Any]) -> Record:
    return {
        "prompt": f"{row['sentence']}\nWhich option fills the blank _?\nAnswer:",
        "choices": [row["option1"], row["option2"]],
        "answer": int(row["answer"]) - 1,
    }


# name -> (dataset, configuration, split, converter)
SETS: dict[str, tuple[str, str | None, str, Callable[[Mapping[str, Any]], Record]]] = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test", arc),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test", arc),
    "boolq": ("google/boolq", None, "validation", boolq),
    "hellaswag": ("Rowan/hellaswag", None, "validation", hellaswag),
    "openbookqa": ("allenai/openbookqa", "main", "test", openbookqa),
    "piqa": ("ybisk/piqa", None, "validation", piqa),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation", winogrande),
}


def records(name: str) -> Iterator[Record]:
    """Converted items of evaluation set ``name`` (one of :data:`SETS`)."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - optional dependency
        raise SystemExit("this script needs `pip install datasets`") from err
    path, config, split, convert = SETS[name]
    for row in datasets.load_dataset(path, config, split=split):
        record = convert(row)
        if len(set(record["choices"])) == len(record["choices"]):  # the loader refuses duplicates
            yield record


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/paper_eval"))
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    args = parser.parse_args(argv)
    for name in args.sets:
        lines = [json.dumps(record, ensure_ascii=False) + "\n" for record in records(name)]
        atomic_write_text(args.out / f"{name}.jsonl", "".join(lines))
        print(f"{name}: {len(lines)} items -> {args.out / f'{name}.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
