"""Run ``tclora.evaluation.evaluate`` in 2 gloo processes on CPU and write each rank's results.

Used by ``tests/test_evaluation.py::test_ddp_evaluation_equals_single_process``::

    python tests/ddp_eval_script.py <tokenizer_dir> <mc.jsonl> <em.jsonl> <out_dir>

Each rank writes ``<out_dir>/rank<r>.json`` with the global results of a multiple-choice set, an
exact-match set and an adapter-routed multiple-choice set on a peft model, plus how many examples
the rank scored itself (to show the work was sharded).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import free_port  # noqa: E402
from test_evaluation import build_models  # noqa: E402

WORLD_SIZE = 2


def _worker(rank: int, port: int, tokenizer_dir: str, mc: str, em: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from transformers import AutoTokenizer

        import tclora.evaluation as ev
        import tclora.evaluation.distributed as ev_distributed

        scored: list[int] = []
        original = ev_distributed._score_group

        def counting(model: Any, tokenizer: Any, examples: list[Any], *a: Any, **k: Any) -> Any:
            scored.append(len(examples))
            return original(model, tokenizer, examples, *a, **k)

        ev_distributed._score_group = counting  # type: ignore[assignment]
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model, peft_model = build_models(len(tokenizer))
        mc_set = ev.load_eval_set(mc)
        em_set = ev.load_eval_set(em)
        routes = ["c0" if i % 3 else "c1" for i in range(len(mc_set))]
        kw: dict[str, Any] = dict(batch_size=3, max_new_tokens=4, progress=False)
        result = {
            "mc": ev.evaluate(model, tokenizer, mc_set, **kw),
            "em": ev.evaluate(model, tokenizer, em_set, chat_template=False, **kw),
            "routed": ev.evaluate(peft_model, tokenizer, mc_set, adapter_per_example=routes, **kw),
            "scored": list(scored),  # before the items calls below
        }
        items: dict[str, dict[str, list[int]]] = {"em": {}, "routed": {}}
        ev.evaluate(model, tokenizer, em_set, chat_template=False, items=items["em"], **kw)
        ev.evaluate(
            peft_model, tokenizer, mc_set, adapter_per_example=routes, items=items["routed"], **kw
        )
        result["items"] = items
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def main() -> None:
    tokenizer_dir, mc, em, out_dir = sys.argv[1:5]
    mp.spawn(
        _worker, args=(free_port(), tokenizer_dir, mc, em, out_dir), nprocs=WORLD_SIZE, join=True
    )


if __name__ == "__main__":
    main()
