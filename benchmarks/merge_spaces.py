"""Benchmark: every baseline merge in full space (peft on dense deltas, then SVD truncation)
against core space (the same methods on the adapters' cores, mapped back), and CP engines.

Part 1, one module: T adapters of rank r on a d × d module; each (method, space) runs in a fresh
process, so its peak memory is its own (Linux ``VmHWM`` reset through ``/proc/self/clear_refs``,
minus the resident size before the run; it counts torch's CPU allocations). Printed: seconds,
peak MB, and the ratio full / core (goal at d = 4096, T = 10, r = 16: ≥ 100× faster).

Part 2, whole model: SmolLM2-135M's 210 LoRA target shapes, T adapters of rank r; seconds of
each method in each space (goal at T = 4, r = 8: every baseline ≤ 1 s in core space on 2 cores).

Usage::

    python benchmarks/merge_spaces.py --quick      # d = 576, T = 4, r = 8; whole model T = 4
    python benchmarks/merge_spaces.py              # d = 576/3072/4096, T = 4/10, r = 8/16; T = 4/8
    python benchmarks/merge_spaces.py --threads 1  # steadier on a shared machine
    python benchmarks/merge_spaces.py --points 576x4x8 4096x10x16   # chosen grid points
    python benchmarks/merge_spaces.py --parts model --adapters runs/demo/adapters/cluster_*
                                                   # part 2 on real adapters (the demo's merges)

Time it alone: with other jobs on the cores, only the ratios within one run mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for `benchmarks`

from benchmarks.common import PeakRSS, smollm2_shapes, synthetic_stack  # noqa: E402

METHODS = ("uniform", "ties", "dare_ties", "magnitude_prune", "cart", "tsv", "iso_c")
SPACES = ("full", "core")


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from tclora.merge import cp_decompose, merge_baseline, merge_cp

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "module":
        stack = synthetic_stack({"model.layers.0.mlp.proj": (args.d, args.d)}, args.t, args.r)
    elif args.adapters:
        from tclora.merge import AdapterStack

        stack = AdapterStack.from_folders([p for a in args.adapters for p in a.split(os.pathsep)])
    else:
        stack = synthetic_stack(smollm2_shapes(), args.t, args.r)
    warm = synthetic_stack({"m": (8, 8)}, 2, 2)
    with PeakRSS() as mem:
        start = time.perf_counter()
        if args.method.startswith("cp:"):
            engine = args.method.split(":", 1)[1]
            cp_decompose(warm, 2, engine, n_iter_max=2)  # type: ignore[arg-type]
            start = time.perf_counter()
            merged = merge_cp(stack, cp_decompose(stack, 4, engine), "mean_loading")  # type: ignore[arg-type]
        else:
            merge_baseline(warm, args.method, merge_space=args.space)
            start = time.perf_counter()
            merged = merge_baseline(stack, args.method, merge_space=args.space)
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "peak_mb": mem.peak_mb,
        "rank": merged.rank,
        "truncation_error": merged.info.get("truncation_error_max", 0.0),
    }


def _point(text: str) -> tuple[int, int, int]:
    """``"4096x10x16"`` → ``(4096, 10, 16)``."""
    try:
        d, t, r = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--points {text!r}: expected dxTxr, e.g. 4096x10x16") from None
    return d, t, r


def run(threads: int, **kw: Any) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--threads", str(threads)]
    for key, value in kw.items():
        if value is not None:
            cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one small grid point of each part")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--max-full-d", type=int, default=4096, help="skip full space above this d")
    parser.add_argument(
        "--points",
        nargs="+",
        default=None,
        help="part 1 grid points as dxTxr (e.g. 576x4x8 4096x10x16); default the full grid",
    )
    parser.add_argument(
        "--parts", nargs="+", choices=["module", "model"], default=["module", "model"]
    )
    parser.add_argument(
        "--adapters",
        nargs="+",
        default=None,
        help="peft adapter folders for the whole-model part (default: synthetic SmolLM2 stacks)",
    )
    # worker mode (internal)
    parser.add_argument("--worker", choices=["module", "model"], default=None, dest="what")
    parser.add_argument("--method", default="uniform")
    parser.add_argument("--space", default="core")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--t", type=int, default=4)
    parser.add_argument("--r", type=int, default=8)
    args = parser.parse_args()
    if args.what is not None:
        print(json.dumps(worker(args)))
        return
    adapters = os.pathsep.join(args.adapters) if args.adapters else None

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    if args.points:
        grid = [_point(p) for p in args.points]
    elif args.quick:
        grid = [(576, 4, 8)]
    else:
        grid = [(d, t, r) for d in (576, 3072, 4096) for t in (4, 10) for r in (8, 16)]
    header = (
        f"{'d':>5} {'T':>3} {'r':>3} {'method':>15} | {'full s':>8} {'core s':>8} {'speed-up':>9} | "
        f"{'full MB':>8} {'core MB':>8} | {'rank':>4} {'trunc err':>9}"
    )
    if "module" in args.parts:
        print("\nOne module, d × d")
        print(header)
        print("-" * len(header))
    for d, t, r in grid if "module" in args.parts else []:
        for method in args.methods:
            res = {
                space: run(args.threads, worker="module", method=method, space=space, d=d, t=t, r=r)
                for space in SPACES
                if space == "core" or d <= args.max_full_d
            }
            core, full = res["core"], res.get("full")
            if full is None:
                print(f"{d:>5} {t:>3} {r:>3} {method:>15} | {'skipped':>8} {core['seconds']:>8.4f}")
                continue
            print(
                f"{d:>5} {t:>3} {r:>3} {method:>15} | {full['seconds']:>8.3f} "
                f"{core['seconds']:>8.4f} {full['seconds'] / max(core['seconds'], 1e-6):>8.0f}× | "
                f"{full['peak_mb']:>8.0f} {core['peak_mb']:>8.1f} | {core['rank']:>4} "
                f"{full['truncation_error']:>9.1e}"
            )

    if "model" not in args.parts:
        return
    if adapters:
        print(f"\nWhole model: {len(args.adapters)} adapters from {args.adapters[0]} ...")
        sizes = [(len(args.adapters), 0)]
    else:
        print("\nWhole model: SmolLM2-135M, 210 modules (q/k/v/o/gate/up/down × 30 layers)")
        sizes = [(t, 8) for t in ((4,) if args.quick else (4, 8))]
    print(f"{'T':>3} {'r':>3} {'method':>15} | {'full s':>8} {'core s':>8} {'speed-up':>9}")
    for t, r in sizes:
        shown = r or "own"
        for method in [*args.methods, "cp:factored", "cp:core"]:
            if method.startswith("cp:"):
                res = run(args.threads, worker="model", method=method, t=t, r=r, adapters=adapters)
                print(f"{t:>3} {shown:>3} {method:>15} | {'':>8} {res['seconds']:>8.3f}")
                continue
            spaces = {
                s: run(
                    args.threads,
                    worker="model",
                    method=method,
                    space=s,
                    t=t,
                    r=r,
                    adapters=adapters,
                )
                for s in SPACES
            }
            full, core = spaces["full"], spaces["core"]
            print(
                f"{t:>3} {shown:>3} {method:>15} | {full['seconds']:>8.2f} {core['seconds']:>8.3f} "
                f"{full['seconds'] / max(core['seconds'], 1e-6):>8.0f}×"
            )


if __name__ == "__main__":
    main()
