"""Training checkpoints kept in the repository: a fit cut by a session's end goes on, on any machine.

A run's fit takes ~1.5-2 h on 2 cores and starts whenever the run before it ends, so a session
often ends mid-fit, and the next session may get a new machine whose ``runs/`` is empty: the fit
starts again from step 0 (mbc4 seed 0's did on 2026-11-27). Pieces
(:mod:`benchmarks.repro.pieces`) keep a run only from the end of its training on. So, at a
session's end, after the sweep was stopped,

    python benchmarks/repro_small.py --keep-checkpoints --commit-records

copies each unfinished fit's ``checkpoints/last.ckpt`` (the adapters and their optimizer state,
~120 MB for 4 adapters), the digest of what made it (``made_by.sha256``) and the seconds of its
attempts into ``<results_dir>/checkpoints/<variant>-seed<seed>/`` with ``checkpoint.json`` (its
step and sha256), and commits them. Every later start of the sweep puts a kept checkpoint back
into its run folder where that folder has none as far on (before the pinned code runs), and the
sweep resumes the fit from it only when it was made by the very same run configuration and code
(:func:`benchmarks.repro.runs.resume_checkpoint`: otherwise it is moved aside and the fit starts
afresh). A kept checkpoint is removed once its run has trained adapters kept or a record. Each
commit adds its size to the history: keep at most one per session. ``.gitignore`` ignores
``*.ckpt`` everywhere but here (``!/benchmarks/results/checkpoints/*/last.ckpt``): without that
exception ``git add`` skipped ``last.ckpt`` and committed the rest, and no machine could resume.

This lives outside ``pieces/`` because the sweep's pinned code (``sweep_code.json``) removes a
piece folder that holds no trained adapters.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from benchmarks.repro.pieces import Piece, commit_paths
from benchmarks.repro.records import record_path
from benchmarks.repro.sweep import Sweep
from tclora._io import atomic_write_text, sha256_file

__all__ = ["Kept", "keep_checkpoints", "restore_checkpoints"]


class Kept:
    """The kept checkpoint of one run: ``<results_dir>/checkpoints/<variant>-seed<seed>/``."""

    def __init__(self, sweep: Sweep, variant: str, seed: int) -> None:
        self.sweep, self.variant, self.seed = sweep, variant, seed
        self.folder = sweep.results_dir / "checkpoints" / f"{variant}-seed{seed}"
        self.piece = Piece(sweep, variant, seed)
        self.run_checkpoints = self.piece.run / "checkpoints"

    def __repr__(self) -> str:
        return f"{self.variant} seed {self.seed}"

    def exists(self) -> bool:
        """Whether a whole kept checkpoint is here."""
        return (self.folder / "checkpoint.json").is_file() and (self.folder / "last.ckpt").is_file()

    def meta(self) -> dict[str, object]:
        """``checkpoint.json`` (empty without one)."""
        path = self.folder / "checkpoint.json"
        return dict(json.loads(path.read_text())) if path.is_file() else {}

    def obsolete(self) -> bool:
        """Whether the run no longer needs it (its adapters are kept, or its record exists)."""
        return (
            self.piece.has_adapters() or record_path(self.sweep, self.variant, self.seed).is_file()
        )

    def save(self) -> int:
        """Keep the run folder's ``last.ckpt``, ``made_by.sha256`` and attempts' seconds.

        Returns:
            The checkpoint's global step.

        Raises:
            FileNotFoundError: The run folder has no checkpoint or no digest beside it.
        """
        for name in ("last.ckpt", "made_by.sha256"):
            if not (self.run_checkpoints / name).is_file():
                raise FileNotFoundError(f"{self}: no {self.run_checkpoints / name} to keep")
        tmp = self.folder.with_name(f".{self.folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        # checkpoints are saved atomically (AtomicCheckpointIO): the copy is of a whole file
        shutil.copy2(self.run_checkpoints / "last.ckpt", tmp / "last.ckpt")
        shutil.copy2(self.run_checkpoints / "made_by.sha256", tmp / "made_by.sha256")
        attempts = self.piece.run / "attempts.json"
        meta = {
            "step": checkpoint_step(tmp / "last.ckpt"),
            "ckpt_sha256": sha256_file(tmp / "last.ckpt"),
            "attempts_seconds": json.loads(attempts.read_text()) if attempts.is_file() else [],
        }
        atomic_write_text(tmp / "checkpoint.json", json.dumps(meta, indent=1) + "\n")
        if self.folder.exists():
            shutil.rmtree(self.folder)
        tmp.rename(self.folder)
        return int(meta["step"])

    def restore(self) -> str:
        """Put the kept checkpoint into the run folder unless that one is as far on.

        Returns:
            ``"restored"``, ``"kept"`` (the run folder's own is as far on), or why it cannot be
            used (its file changed since it was kept).
        """
        meta = self.meta()
        if sha256_file(self.folder / "last.ckpt") != meta.get("ckpt_sha256"):
            return "its last.ckpt is not the file checkpoint.json names (sha256 differs)"
        last = self.run_checkpoints / "last.ckpt"
        if last.is_file():
            try:
                if checkpoint_step(last) >= int(meta["step"]):  # type: ignore[call-overload]
                    return "kept"
            except Exception:  # noqa: BLE001 - an unreadable one is replaced
                pass
        self.run_checkpoints.mkdir(parents=True, exist_ok=True)
        for name in ("made_by.sha256", "last.ckpt"):
            tmp = self.run_checkpoints / f".{name}.tmp"
            shutil.copy2(self.folder / name, tmp)
            tmp.replace(self.run_checkpoints / name)
        attempts = self.piece.run / "attempts.json"
        if not attempts.is_file() and meta.get("attempts_seconds"):
            atomic_write_text(attempts, json.dumps(meta["attempts_seconds"]))
        return "restored"


def checkpoint_step(path: Path) -> int:
    """The ``global_step`` of a Lightning checkpoint (read weights-only, memory-mapped)."""
    import torch

    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])


def _runs(sweep: Sweep) -> list[Kept]:
    return [Kept(sweep, v, s) for s in sweep.seeds for v in sweep.variants]


def keep_checkpoints(sweep: Sweep, commit: bool) -> list[str]:
    """Keep the last checkpoint of every fit unfinished on this machine (committed when
    ``commit``), and remove kept checkpoints whose runs no longer need them.

    Returns:
        One line per run acted on.
    """
    lines = _retire(sweep, commit)
    for kept in _runs(sweep):
        if kept.obsolete() or not (kept.run_checkpoints / "last.ckpt").is_file():
            continue
        if kept.exists() and sha256_file(kept.run_checkpoints / "last.ckpt") == kept.meta().get(
            "ckpt_sha256"
        ):
            lines.append(f"[ckpt] {kept}: its checkpoint is kept already")
            continue
        step = kept.save()
        lines.append(f"[ckpt] {kept}: checkpoint at step {step} kept in {kept.folder}")
        if commit:
            commit_paths(
                [kept.folder],
                f"Sweep checkpoint: {kept}, training at step {step} (the fit resumes from it on "
                "any machine)",
            )
    return lines


def restore_checkpoints(sweep: Sweep, commit: bool) -> list[str]:
    """Before the sweep runs: put every kept checkpoint its run still needs into the run folder,
    and remove (committed when ``commit``) those it no longer needs or that changed.

    Returns:
        One line per kept checkpoint acted on.
    """
    lines = _retire(sweep, commit)
    for kept in _runs(sweep):
        if not kept.exists():
            continue
        outcome = kept.restore()
        step = kept.meta().get("step")
        if outcome == "restored":
            lines.append(
                f"[ckpt] {kept}: its kept checkpoint (step {step}) put into {kept.run_checkpoints}"
            )
        elif outcome != "kept":
            lines.append(f"[ckpt] {kept}: {outcome}; removed {kept.folder}")
            shutil.rmtree(kept.folder)
            if commit:
                commit_paths([kept.folder], f"Sweep checkpoint: {kept} removed ({outcome})")
    return lines


def _retire(sweep: Sweep, commit: bool) -> list[str]:
    lines = []
    for kept in _runs(sweep):
        if kept.folder.exists() and kept.obsolete():
            shutil.rmtree(kept.folder)
            lines.append(
                f"[ckpt] {kept}: trained (adapters kept or recorded); removed {kept.folder}"
            )
            if commit:
                commit_paths([kept.folder], f"Sweep checkpoint: {kept} removed (training is over)")
    return lines
