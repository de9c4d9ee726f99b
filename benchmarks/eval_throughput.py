"""Benchmark: evaluation throughput of a merged adapter, before/after each lever, in one run.

The sweep scores ~150 models on ~3,600 items each; evaluation is most of its time. This script
scores SmolLM2-135M-Instruct with a rank-32 LoRA adapter (the size of a K = 4, r = 8 merge) on
the same items of registry tasks -- multiple choice and short-answer generation, as the sweep's
sets -- under each configuration, and prints seconds, tokens/s (prompt + choice tokens scored,
prompt tokens for generation) and the ratio to the baseline, plus how many per-item predictions
agree with the baseline's (a lever is kept only if they agree on ≥ 99% of items).

Configurations:

* ``baseline``: the scorer before these levers (float32, the adapter as a peft LoRA layer, batch
  16, generation always runs ``max_new_tokens`` steps);
* ``shared prefix``: multiple choice runs the token prefix common to a set's inputs (chat
  template + the task's instruction: 30-80% of the tokens of registry tasks) once and reuses its
  key/value cache (``share_prefix``, the scorer's default now);
* ``first-line stop``: a generated row stops once its first non-empty line -- the answer -- is
  complete (what the scorer does now; answers identical by construction);
* ``batch32``: 32 rows per forward / prompts per ``generate``;
* ``folded``: the adapter added into the base weights for the evaluation (``fold_adapter``:
  peft's ``merge_adapter`` on a copy of the touched weights, restored bit-exactly afterwards);
* ``bf16`` (``--configs ... bf16``, not run by default): ``torch.autocast`` to bfloat16 (fast only
  on CPUs with native bf16, avx512_bf16 / AMX; emulated elsewhere: 6× slower on this AMD EPYC);
* combinations of the above.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/eval_throughput.py              # 60 items per set
    HF_HUB_OFFLINE=1 python benchmarks/eval_throughput.py --items 200  # the sweep's size

Time it alone: with other jobs on the cores, only the ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the sweep's mix: 14 multiple-choice sets to 4 short-answer ones, here 3 to 1
SETS = (
    "registry:food",
    "registry:sarcasm",
    "registry:formal_logic",
    "registry:imperial_date_to_string",
)


def _config(
    batch_size: int = 16,
    prefix: bool = False,
    fold: bool = False,
    stop: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """One configuration: the baseline's settings with the named levers changed."""
    return {"batch_size": batch_size, "prefix": prefix, "fold": fold, "stop": stop, "bf16": bf16}


CONFIGS: dict[str, dict[str, Any]] = {
    "baseline": _config(),
    "shared prefix": _config(prefix=True),
    "first-line stop": _config(stop=True),
    "folded": _config(fold=True),
    "batch32": _config(batch_size=32),
    "prefix+stop+folded": _config(prefix=True, stop=True, fold=True),
    "all + batch32": _config(batch_size=32, prefix=True, stop=True, fold=True),
    "bf16": _config(bf16=True),
}
DEFAULT_CONFIGS = [c for c in CONFIGS if c != "bf16"]


def _tokens(tokenizer: Any, eval_set: Any) -> int:
    """Tokens the scorer reads: prompt + each choice for multiple choice, the prompt otherwise."""
    from tclora.data import render_prompt

    total = 0
    for ex in eval_set.examples:
        prompt = len(tokenizer(render_prompt(tokenizer, ex.prompt, True))["input_ids"])
        choices = ex.choices or ("",)
        total += sum(prompt + len(tokenizer(c)["input_ids"]) for c in choices)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60, help="items per set (seeded subsample)")
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, choices=list(CONFIGS))
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank of the scored adapter")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes (the minimum counts)")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tclora.evaluation.scoring as scoring
    from tclora.assets import resolve_model
    from tclora.evaluation import evaluate, load_eval_set

    first_line_done = scoring._first_line_done

    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # a nonzero delta, like a trained merge
    )
    torch.manual_seed(0)
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.02)  # deltas of a trained adapter's size, not a random rank-32 blow-up
    sets = [load_eval_set(s, max_items=args.items, seed=0) for s in args.sets]
    tokens = sum(_tokens(tokenizer, s) for s in sets)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M + LoRA r "
        f"{args.rank}; sets {[f'{s.name} ({s.kind}, {len(s)})' for s in sets]}; {tokens} tokens"
    )
    results: dict[str, tuple[float, list[int]]] = {}
    for name in args.configs:
        cfg = CONFIGS[name]
        best = float("inf")
        preds: list[int] = []
        # "stop" off: generation runs every max_new_tokens step, as before the lever
        scoring._first_line_done = first_line_done if cfg["stop"] else (lambda *a: None)  # type: ignore[assignment]
        for _ in range(args.repeats):
            preds = []
            autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg["bf16"] else nullcontext()
            start = time.perf_counter()
            with autocast:
                for s in sets:
                    items: dict[str, list[int]] = {}
                    evaluate(
                        model,
                        tokenizer,
                        s,
                        batch_size=cfg["batch_size"],
                        max_length=256,
                        max_new_tokens=12,
                        progress=False,
                        fold_adapter=cfg["fold"],
                        share_prefix=cfg["prefix"],
                        items=items,
                    )
                    preds += items["acc" if "acc" in items else "exact_match"]
            best = min(best, time.perf_counter() - start)
        results[name] = (best, preds)
        print(f"  {name}: {best:.1f} s", flush=True)

    base_s, base_preds = results.get("baseline", next(iter(results.values())))
    header = (
        f"{'configuration':>16} | {'seconds':>8} {'tokens/s':>9} {'speed-up':>9} | {'agree':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, (seconds, preds) in results.items():
        agree = sum(a == b for a, b in zip(preds, base_preds, strict=True)) / len(base_preds)
        print(
            f"{name:>16} | {seconds:>8.1f} {tokens / seconds:>9.0f} {base_s / seconds:>8.2f}× "
            f"| {100 * agree:>5.1f}%"
        )
    print(
        "(agree: per-item correctness equal to the baseline's, an upper bound on equal "
        "predictions; goal: speed-up ≥ 2×)"
    )


if __name__ == "__main__":
    main()
