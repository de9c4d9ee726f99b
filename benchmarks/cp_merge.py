"""Benchmark: factored CP-ALS (never builds ΔW) against tensorly ``parafac`` on the dense stack.

Part 1, one module: T adapters of rank r on a d × d module, CP rank R, the same number of ALS
sweeps (``tol=0``) from the same random initial factors (``init="random"``, same seed), float64.
Each run is a fresh process, so its peak memory is its own: the peak resident set size (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``; it counts torch's CPU
allocations, which ``tracemalloc`` does not) minus the resident size before the run. Printed:
wall time, peak memory, fit error of both engines and their ratios (goal at d = 3072: ≥ 100×
faster, ≥ 50× less memory, same fit error ± 1e-3).

Part 2, whole model: SmolLM2-135M's real LoRA target shapes (q, k, v, o, gate, up, down over
30 layers = 210 modules), random rank-r factors for T adapters; time of ``cp_decompose``
(default ``tol``/``n_iter_max``) + ``merge_cp``, factored (and dense, unless ``--quick``).

Usage::

    python benchmarks/cp_merge.py --quick          # d = 576, 3072 at R = 4; < 2 minutes
    python benchmarks/cp_merge.py                  # d = 576, 3072, 4096; dense whole model too
    python benchmarks/cp_merge.py --quick --threads 1   # on a shared, loaded machine

On a machine shared with other jobs, OpenMP spin-waits can slow small torch kernels by 10-100×
at 2+ threads; ``--threads 1`` gives steadier numbers (both engines get the same setting).
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


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this (fresh) process."""
    import torch

    from tclora.merge import cp_decompose, merge_cp

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "module":
        stack = synthetic_stack({"model.layers.0.mlp.proj": (args.d, args.d)}, args.t, args.r)
        kw: dict[str, Any] = dict(n_iter_max=args.sweeps, tol=0.0, init="random", seed=0)
    else:
        stack = synthetic_stack(smollm2_shapes(), args.t, args.r)
        kw = dict(n_iter_max=args.sweeps, tol=args.tol, init="svd", seed=0)
    cp_decompose(
        synthetic_stack({"m": (8, 8)}, 2, 2), 2, args.engine, n_iter_max=2
    )  # warm up the kernels
    with PeakRSS() as mem:
        start = time.perf_counter()
        cp = cp_decompose(stack, args.R, args.engine, dtype=torch.float64, **kw)
        merged = merge_cp(stack, cp, "mean_loading")
        seconds = time.perf_counter() - start
    fits = [c.fit_error for c in cp.values()]
    return {
        "seconds": seconds,
        "peak_mb": mem.peak_mb,
        "fit_error": sum(fits) / len(fits),
        "n_iter": sum(c.n_iter for c in cp.values()) / len(cp),
        "modules": len(cp),
        "rank": merged.rank,
    }


def run(what: str, engine: str, threads: int, **kw: Any) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        what,
        "--engine",
        engine,
        "--threads",
        str(threads),
    ]
    for key, value in kw.items():
        cmd += [f"--{key}", str(value)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_estimate_gb(d: int, t: int, rank: int) -> float:
    """Dense engine peak: the tensor, one unfolding copy and the Khatri-Rao product (float64)."""
    return 8 * (2 * t * d * d + d * d * rank) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="d = 576, 3072 at R = 4 and the factored whole model"
    )
    parser.add_argument("--dims", type=int, nargs="+", default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=None)
    parser.add_argument("--t", type=int, default=10)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--sweeps", type=int, default=10)
    parser.add_argument("--model-rank", type=int, default=4)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)"
    )
    parser.add_argument(
        "--max-dense-gb", type=float, default=None, help="skip dense runs above this estimate"
    )
    # worker mode (internal)
    parser.add_argument("--worker", choices=["module", "model"], default=None, dest="what")
    parser.add_argument("--engine", default="factored")
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--R", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-8)
    args = parser.parse_args()
    if args.what is not None:
        print(json.dumps(worker(args)))
        return

    import psutil
    import torch

    dims = args.dims or ([576, 3072] if args.quick else [576, 3072, 4096])
    ranks = args.ranks or ([4] if args.quick else [4, 32])
    max_gb = args.max_dense_gb or 0.6 * psutil.virtual_memory().available / 1e9
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
        f"T={args.t} adapters of rank r={args.r}, {args.sweeps} sweeps from the same random init, float64"
    )
    header = (
        f"{'d':>5} {'R':>3} | {'factored s':>10} {'dense s':>9} {'speed-up':>9} | "
        f"{'factored MB':>11} {'dense MB':>9} {'mem ratio':>9} | {'fit factored':>12} {'fit dense':>10} {'|Δfit|':>8}"
    )
    print(header)
    print("-" * len(header))
    for d in dims:
        for rank in ranks:
            kw = dict(d=d, R=rank, t=args.t, r=args.r, sweeps=args.sweeps)
            fac = run("module", "factored", args.threads, **kw)
            est = dense_estimate_gb(d, args.t, rank)
            if est > max_gb:
                print(
                    f"{d:>5} {rank:>3} | {fac['seconds']:>10.3f} {'skipped':>9} {'':>9} | "
                    f"{fac['peak_mb']:>11.1f} {f'~{est:.0f} GB':>9} {'':>9} | {fac['fit_error']:>12.6f}"
                )
                continue
            den = run("module", "dense", args.threads, **kw)
            speed = den["seconds"] / fac["seconds"]
            mem = den["peak_mb"] / max(fac["peak_mb"], 0.004)  # one 4 KiB page at least
            print(
                f"{d:>5} {rank:>3} | {fac['seconds']:>10.3f} {den['seconds']:>9.2f} {speed:>8.0f}× | "
                f"{fac['peak_mb']:>11.1f} {den['peak_mb']:>9.0f} {mem:>8.0f}× | "
                f"{fac['fit_error']:>12.6f} {den['fit_error']:>10.6f} {abs(fac['fit_error'] - den['fit_error']):>8.1e}"
            )

    print(
        f"\nWhole model: SmolLM2-135M, q/k/v/o/gate/up/down × 30 layers, T={args.t}, r={args.r}, "
        f"R={args.model_rank}, SVD init, tol=1e-8, ≤ 100 sweeps, + merge_cp(mean_loading)"
    )
    print(
        f"{'engine':>9} | {'modules':>7} {'seconds':>8} {'peak MB':>8} {'mean sweeps':>11} {'mean fit':>9}"
    )
    engines = ["factored"] if args.quick else ["factored", "dense"]
    for engine in engines:
        res = run(
            "model",
            engine,
            args.threads,
            R=args.model_rank,
            t=args.t,
            r=args.r,
            sweeps=100,
            tol=1e-8,
        )
        print(
            f"{engine:>9} | {res['modules']:>7} {res['seconds']:>8.2f} {res['peak_mb']:>8.0f} "
            f"{res['n_iter']:>11.1f} {res['fit_error']:>9.4f}"
        )


if __name__ == "__main__":
    main()
