"""The sweep's fixed data: per training task a train file and a disjoint test file, per unseen
task a test file, the majority-answer floor of each training task, and ``manifest.json``.
"""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmarks.repro.sweep import SPLIT_SEED, Sweep
from tclora._io import atomic_write_text

__all__ = ["majority_floor", "prepare_data"]


def _jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _test_record(example: Any) -> dict[str, Any]:
    """An ``EvalExample`` as a local JSONL line that ``load_eval_set`` reads back as the same item."""
    if example.choices is not None:
        return {
            "prompt": example.prompt,
            "choices": list(example.choices),
            "answer": example.answers[0],
            "task": example.task,
        }
    return {"prompt": example.prompt, "answer": list(example.answers), "task": example.task}


def _dedupe(examples: Sequence[Any]) -> list[Any]:
    """Drop items whose prompt repeats an earlier one (a repeat could leak test into train)."""
    seen: set[str] = set()
    out = []
    for ex in examples:
        key = json.dumps(ex.prompt, sort_keys=True, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            out.append(ex)
    return out


def _chance(eval_set: Any) -> float:
    """Accuracy of a uniform guess: 1 / choices for multiple choice, 0 for short answers."""
    if eval_set.kind == "multiple_choice":
        return 1.0 / len(eval_set.examples[0].choices)
    return 0.0


def majority_floor(train_answers: Sequence[str], test_examples: Sequence[Any]) -> dict[str, Any]:
    """Accuracy of always answering the training split's most frequent answer.

    Args:
        train_answers: Gold answer of every training item.
        test_examples: Test items (``EvalExample``; exact-match items may accept several answers).

    Returns:
        ``{"answer": the majority answer, "accuracy": its accuracy on the test items}``.
    """
    from tclora.evaluation import is_exact_match

    answer = collections.Counter(train_answers).most_common(1)[0][0]
    hits = [
        (ex.answers[0] == answer) if ex.choices is not None else is_exact_match(answer, ex.answers)
        for ex in test_examples
    ]
    return {"answer": answer, "accuracy": sum(hits) / len(hits)}


def prepare_data(sweep: Sweep) -> dict[str, Any]:
    """Write the fixed splits and ``manifest.json``; return the manifest.

    Training task items are deduplicated by prompt and permuted with ``SPLIT_SEED``: the first
    ``test_items`` are the test split, the next ``train_items`` the training file. Unseen tasks
    get a seeded sample of ``ood_items`` (or all of them).
    """
    from tclora.evaluation import load_eval_set

    data = sweep.work_dir / "data"
    manifest_path = data / "manifest.json"
    wanted = {
        "train_tasks": list(sweep.train_tasks),
        "ood_tasks": list(sweep.ood_tasks),
        "train_items": sweep.train_items,
        "test_items": sweep.test_items,
        "ood_items": sweep.ood_items,
        "split_seed": SPLIT_SEED,
    }
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("settings") == wanted:
            return dict(manifest)
        raise SystemExit(
            f"{manifest_path} was written with other split settings ({manifest.get('settings')}); "
            f"use another --work-dir or delete {sweep.work_dir} to start over"
        )
    tasks: dict[str, Any] = {}
    for task in sweep.train_tasks:
        es = load_eval_set(f"registry:{task}")
        items = _dedupe(es.examples)
        need = sweep.test_items + sweep.train_items
        if len(items) < need:
            raise SystemExit(
                f"training task {task!r} has {len(items)} distinct items; the split needs {need} "
                f"(test_items={sweep.test_items} + train_items={sweep.train_items})"
            )
        order = random.Random(f"{SPLIT_SEED}:{task}").sample(range(len(items)), need)
        test = [items[i] for i in order[: sweep.test_items]]
        train = [items[i] for i in order[sweep.test_items :]]
        atomic_write_text(data / "test" / f"{task}.jsonl", _jsonl(_test_record(e) for e in test))
        atomic_write_text(
            data / "train" / f"{task}.jsonl",
            _jsonl({"prompt": e.prompt, "response": e.answers[0], "task": task} for e in train),
        )
        tasks[task] = {
            "group": "in_domain",
            "kind": es.kind,
            "n_test": len(test),
            "n_train": len(train),
            "chance": _chance(es),
            "majority": majority_floor([e.answers[0] for e in train], test),
        }
    for task in sweep.ood_tasks:
        es = load_eval_set(f"registry:{task}")
        items = _dedupe(es.examples)
        n = min(sweep.ood_items, len(items))
        keep = sorted(random.Random(f"{SPLIT_SEED}:{task}").sample(range(len(items)), n))
        atomic_write_text(
            data / "ood" / f"{task}.jsonl", _jsonl(_test_record(items[i]) for i in keep)
        )
        tasks[task] = {
            "group": "out_of_domain",
            "kind": es.kind,
            "n_test": n,
            "chance": _chance(es),
        }
    manifest = {"settings": wanted, "tasks": tasks}
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))
    return manifest
