"""Pieces of an unfinished run, committed as they finish: a run longer than a session goes on from
the repository, on any machine.

One run of the sweep (a fit of ~75 min, then a merge study of 2-3.5 h on 2 cores) outlasts a
session, and the next session may get a new machine whose ``runs/`` is empty. So two things of a
run in progress are kept under ``<results_dir>/pieces/<variant>-seed<s>/`` and committed:

* ``adapters/``: the trained adapters (peft folders, float32 safetensors: bit for bit the weights
  the merge study merges), exported by :class:`SaveTrainedAdapters` when training ends, with the
  run's TensorBoard event files of training (``tensorboard/``) and ``piece.json``, which names
  what trained them (:func:`training_identity`);
* ``merge_progress.json``: the merge study's finished rows with their fingerprint, copied from
  the run folder as rows finish (at most every :data:`PROGRESS_EVERY` seconds).

A later session restores both into the run folder and runs the merge study alone
(:func:`study_only_overrides`: ``trainer.max_steps: 0`` and :class:`LoadTrainedAdapters`). The
data module, its validation batches and the adapters are the same bit for bit, so the study's
fingerprint is the same: it takes the committed rows and computes only the others. A piece made
by another training identity (run configuration, sweep digest, tclora source, package versions)
is never used: it is removed (``git rm``) and the run fitted afresh, saying which part differs.
When the run's record lands its piece is removed; the per_task adapters stay until the seed's MBC
runs, which group them, have their records.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from benchmarks.repro.sweep import ROOT, Sweep, run_dir
from tclora._io import atomic_write_text, sha256_file

__all__ = [
    "DATAMODULE_STATE",
    "PROGRESS_EVERY",
    "LoadTrainedAdapters",
    "Piece",
    "PieceKeeper",
    "SaveTrainedAdapters",
    "check_tclora_source",
    "checkout_of",
    "commit_paths",
    "load_datamodule_state",
    "retire_pieces",
    "save_datamodule_state",
    "status_lines",
    "study_only_overrides",
    "training_identity",
]

PROGRESS_EVERY = 600.0  # seconds between commits of a study's progress (a row takes 2-10 min)
_PACKAGES = ("torch", "transformers", "peft", "lightning")
TRAINED = "trained_adapters"  # in the run folder: where SaveTrainedAdapters exports
DATAMODULE_STATE = "datamodule_state.safetensors"  # beside it: the clusters the adapters learnt


def commit_paths(paths: Sequence[Path], message: str, repo: Path | None = None) -> bool:
    """``git commit`` exactly ``paths`` (additions, changes and removals under them), nothing else
    that is staged or changed. A failure (not a checkout, a lock held, no identity) is printed and
    leaves the files for a later or a manual commit.

    Args:
        paths: Files or folders inside ``repo`` (a removed one is committed as removed).
        message: The commit message.
        repo: The checkout (default: the one that holds ``paths[0]``).

    Returns:
        Whether the commit was made.
    """
    names = [str(p) for p in paths]
    if repo is None and paths:
        repo = checkout_of(Path(paths[0]))
    for command in (
        ["git", "add", "-A", "--", *names],
        ["git", "commit", "-q", "-m", message, "--", *names],
    ):
        done = subprocess.run(command, cwd=repo or ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(
                f"[git ] could not commit {', '.join(names)} ({' '.join(command[:2])}: "
                f"{(done.stderr or done.stdout).strip()}); commit it by hand",
                file=sys.stderr,
            )
            return False
    print(f"[git ] committed {', '.join(names)}", flush=True)
    return True


def checkout_of(path: Path) -> Path:
    """The git checkout that holds ``path`` (which may be gone: a removed piece): the records of a
    sweep run from its pinned worktree are committed in the checkout it was started from."""
    folder = path if path.is_dir() else path.parent
    while not folder.is_dir():
        folder = folder.parent
    done = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True
    )
    return Path(done.stdout.strip()) if done.returncode == 0 else ROOT


def training_identity(
    overrides: dict[str, Any], training_digest: str, roots: Mapping[str, Path] | None = None
) -> dict[str, Any]:
    """What a run's adapters are made by, one entry per part (so a mismatch can say which).

    Args:
        overrides: The run's override config (:func:`benchmarks.repro.runs.run_overrides`); its
            trainer callbacks (the merge study's options, checkpoints) do not train and are left
            out.
        training_digest: The sweep's :func:`benchmarks.repro.records.training_digest`.
        roots: Folders written as ``<label>`` in the identity, in this order (the sweep's work
            folder, the checkout): a checkout laid at another path trains the same adapters.

    Returns:
        ``{"run", "sweep", "tclora_source", "packages"}``.
    """
    import tclora

    trainer = {k: v for k, v in overrides.get("trainer", {}).items() if k != "callbacks"}
    text = json.dumps({**overrides, "trainer": trainer}, sort_keys=True)
    for label, root in (roots or {}).items():
        text = text.replace(str(root), f"<{label}>")
    return {
        "run": json.loads(text),
        "sweep": training_digest,
        "tclora_source": tclora.SOURCE_DIGEST,
        "packages": {p: version(p) for p in _PACKAGES},
    }


def check_tclora_source() -> None:
    """Refuse to start a run when ``tclora/`` on disk is not the source this sweep imported.

    A run's identity (:func:`training_identity`) names the source the sweep imported
    (``tclora.SOURCE_DIGEST``), but its fit runs in a new process that imports the files as they
    are now: after an edit, the piece would name code that did not train it.

    Raises:
        SystemExit: The source changed since the sweep started (restart the sweep).
    """
    import tclora

    now = tclora._source_digest()
    if now != tclora.SOURCE_DIGEST:
        raise SystemExit(
            f"tclora/ changed since this sweep started (source {tclora.SOURCE_DIGEST[:12]} then, "
            f"{now[:12]} now): a run fitted now would be stamped with code that did not train "
            "it; restart the sweep (finished runs and committed pieces are kept)"
        )


def _folder_digest(folder: Path) -> str:
    """sha256 over the relative paths and contents of every file under ``folder``."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary sibling: ``dst`` is whole or absent."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def save_datamodule_state(state: Mapping[str, Any], path: Path) -> None:
    """Write a data module's ``state_dict`` (its clusters) as safetensors, atomically: tensors
    as tensors, every other entry as JSON in the file's metadata."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"scalars": json.dumps(scalars, sort_keys=True)})
    tmp.replace(path)


def load_datamodule_state(path: Path) -> dict[str, Any]:
    """Read what :func:`save_datamodule_state` wrote."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        scalars = json.loads((handle.metadata() or {})["scalars"])
        return {**scalars, **{k: handle.get_tensor(k) for k in handle.keys()}}  # noqa: SIM118


class Piece:
    """The committed pieces of one run: ``<results_dir>/pieces/<variant>-seed<seed>/``."""

    def __init__(self, sweep: Sweep, variant: str, seed: int) -> None:
        self.sweep, self.variant, self.seed = sweep, variant, seed
        self.folder = sweep.results_dir / "pieces" / f"{variant}-seed{seed}"
        self.adapters = self.folder / "adapters"
        self.progress = self.folder / "merge_progress.json"
        self.meta = self.folder / "piece.json"
        self.datamodule = self.folder / DATAMODULE_STATE
        self.run = run_dir(sweep, variant, seed)

    def __repr__(self) -> str:
        return f"{self.variant} seed {self.seed}"

    def read_meta(self) -> dict[str, Any]:
        return dict(json.loads(self.meta.read_text())) if self.meta.is_file() else {}

    def has_adapters(self) -> bool:
        """Whether a whole set of trained adapters is here (its manifest and ``piece.json``)."""
        return (self.adapters / "tclora_adapters.json").is_file() and self.meta.is_file()

    def mismatch(self, identity: dict[str, Any]) -> list[str]:
        """The parts of ``identity`` (:func:`training_identity`) the kept adapters differ in,
        ``["piece.json"]`` when it is unreadable, ``[]`` when they were made by it."""
        try:
            made_by = self.read_meta()["made_by"]
        except (ValueError, KeyError, TypeError):
            return ["piece.json"]
        current = json.loads(json.dumps(identity, sort_keys=True))
        return sorted(k for k in set(made_by) | set(current) if made_by.get(k) != current.get(k))

    def committed_rows(self) -> int:
        """How many merge-study rows the kept ``merge_progress.json`` holds (0 without one)."""
        if not self.progress.is_file():
            return 0
        return len(json.loads(self.progress.read_text()).get("rows", []))

    def attempts(self) -> list[float]:
        """Seconds of this run's attempts in earlier sessions, as last committed."""
        return [float(s) for s in self.read_meta().get("attempts_seconds", [])]

    def save_adapters(self, trained: Path, identity: dict[str, Any], attempts: list[float]) -> None:
        """Keep the adapters exported to ``trained`` (and the run's TensorBoard events)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        _copy_dir(trained, self.adapters)
        state = trained.parent / DATAMODULE_STATE  # written before the adapters
        if state.is_file():
            shutil.copy2(state, self.datamodule)
        events = self.run / "tensorboard"
        if events.is_dir():
            _copy_dir(events, self.folder / "tensorboard")
        self.write_meta(identity=identity, attempts=attempts)

    def write_meta(
        self, identity: dict[str, Any] | None = None, attempts: list[float] | None = None
    ) -> None:
        meta = self.read_meta()
        if identity is not None:
            meta["made_by"] = json.loads(json.dumps(identity, sort_keys=True))
            meta["adapters_sha256"] = _folder_digest(self.adapters)
        if attempts is not None:
            meta["attempts_seconds"] = [round(s, 1) for s in attempts]
        atomic_write_text(self.meta, json.dumps(meta, indent=1, sort_keys=True) + "\n")

    def verify(self) -> str | None:
        """Why the kept adapters cannot be used (files changed since they were kept), or None."""
        want = self.read_meta().get("adapters_sha256")
        if want != _folder_digest(self.adapters):
            return f"{self.adapters} does not hold the files piece.json names (sha256 differs)"
        return None

    def restore(self) -> None:
        """Put the kept study progress and training events into the run folder (what a new
        machine lacks; a run folder that has its own, at least as new, keeps them)."""
        merge = self.run / "merge"
        merge.mkdir(parents=True, exist_ok=True)
        if self.progress.is_file() and not (merge / self.progress.name).is_file():
            shutil.copy2(self.progress, merge / self.progress.name)
        events = self.folder / "tensorboard"
        if events.is_dir() and not (self.run / "tensorboard").is_dir():
            shutil.copytree(events, self.run / "tensorboard")
        attempts = self.run / "attempts.json"
        if not attempts.is_file() and self.attempts():
            atomic_write_text(attempts, json.dumps(self.attempts()))

    def discard(self, why: str, commit: bool) -> None:
        """Remove the piece (committed as removed when ``commit``), saying why."""
        print(f"[piece] {self}: {why}; removed {self.folder}", flush=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        if commit:
            commit_paths([self.folder], f"Sweep piece: {self} removed ({why})")


def retire_pieces(sweep: Sweep, variant: str, seed: int) -> list[Path]:
    """Remove the pieces that the record of ``variant`` seed ``seed`` (just written) made useless:
    that run's own, except the per_task adapters while a ``mbc*`` run of the seed still lacks its
    record (they are its stage 1); and, once the last of those lands, the per_task piece.

    Returns:
        The piece folders removed (to commit as removed).
    """
    from benchmarks.repro.records import record_path

    def mbc_pending() -> bool:
        return any(
            v.startswith("mbc") and not record_path(sweep, v, seed).is_file()
            for v in sweep.variants
        )

    retire = []
    if not (variant == "per_task" and mbc_pending()):
        retire.append(Piece(sweep, variant, seed))
    if variant.startswith("mbc") and record_path(sweep, "per_task", seed).is_file():
        if not mbc_pending():
            retire.append(Piece(sweep, "per_task", seed))
    removed = []
    for piece in retire:
        if piece.folder.exists():
            shutil.rmtree(piece.folder)
            removed.append(piece.folder)
            print(f"[piece] {piece}: its record holds the run; removed {piece.folder}", flush=True)
    return removed


def status_lines(sweep: Sweep) -> list[str]:
    """One line per run of the sweep, in run order: recorded, trained (with its committed study
    rows), started on this machine, or not started."""
    from benchmarks.repro.records import record_path

    lines = []
    for seed in sweep.seeds:
        for variant in sweep.variants:
            piece = Piece(sweep, variant, seed)
            if record_path(sweep, variant, seed).is_file():
                state = "recorded"
            elif piece.has_adapters():
                rows = piece.committed_rows()
                state = f"trained; adapters and {rows} study rows committed (the study goes on)"
            elif (piece.run / "checkpoints" / "last.ckpt").is_file():
                state = f"training on this machine ({_checkpoint_at(piece)}, nothing committed yet)"
            else:
                state = "not started"
            lines.append(f"{variant} seed {seed}: {state}")
    return lines


def _checkpoint_at(piece: Piece) -> str:
    """``"checkpoint at step N"`` for the run folder's ``last.ckpt``, or why it cannot be read."""
    from benchmarks.repro.checkpoints import checkpoint_step  # it imports this module

    try:
        return f"checkpoint at step {checkpoint_step(piece.run / 'checkpoints' / 'last.ckpt')}"
    except Exception as err:  # noqa: BLE001 - the status reports, it does not fail
        return f"checkpoint unreadable: {type(err).__name__}"


def study_only_overrides(overrides: dict[str, Any], piece: Piece) -> dict[str, Any]:
    """A run's overrides turned into its merge study alone, on the kept adapters: no training
    step, no checkpoints, :class:`LoadTrainedAdapters` before every other callback."""
    trainer = dict(overrides["trainer"])
    callbacks = [c for c in trainer["callbacks"] if not c["class_path"].endswith("ModelCheckpoint")]
    load = {
        "class_path": f"{__name__}.LoadTrainedAdapters",
        "init_args": {
            "folder": str(piece.adapters),
            "datamodule_state": str(piece.datamodule) if piece.datamodule.is_file() else None,
        },
    }
    trainer.update(max_steps=0, enable_checkpointing=False, callbacks=[load, *callbacks])
    return {**overrides, "trainer": trainer}


class SaveTrainedAdapters(Callback):
    """Export every adapter as a peft folder when training ends, before the merge study (put this
    callback before ``CPMergeCallback``: the study runs in ``on_fit_end``), with what
    ``LoRAModule``'s own export lacks: the data module's state (the clusters the adapters learnt
    from), written first, beside the folder (:data:`DATAMODULE_STATE`).

    Exports in ``on_train_end``; a fit resumed from a checkpoint of its final step trains nothing
    and never calls it, so ``on_fit_end`` exports then. A fit of no step exports nothing.

    Args:
        folder: The export folder (absent, empty or an earlier export; replaced at once).
    """

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._saved = False

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._saved:
            self._save(trainer, pl_module)

    def _save(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_step == 0 or not trainer.is_global_zero:
            return
        export = getattr(pl_module, "export_adapters", None)
        if export is None:
            raise TypeError(
                f"SaveTrainedAdapters: {type(pl_module).__name__} has no export_adapters(); "
                "it works on tclora.LoRAModule"
            )
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and datamodule.state_dict():
            Path(self.folder).parent.mkdir(parents=True, exist_ok=True)
            save_datamodule_state(
                datamodule.state_dict(), Path(self.folder).parent / DATAMODULE_STATE
            )
        import tclora

        # the source this fit process runs: the sweep keeps the piece only when it is the one
        # the run's identity names (PieceKeeper)
        export(
            self.folder, note={"step": trainer.global_step, "tclora_source": tclora.SOURCE_DIGEST}
        )
        self._saved = True


class LoadTrainedAdapters(Callback):
    """Load adapters trained in an earlier session into the module, for a fit that only runs its
    ``on_fit_end`` work (``trainer.max_steps: 0``): every adapter of the module must be in
    ``folder``, and every one of its LoRA tensors must come out equal to the file.

    Args:
        folder: An export of the same module configuration (``tclora_adapters.json`` and one
            peft folder per adapter).
        datamodule_state: The data module's state when the adapters were trained
            (:func:`save_datamodule_state`), restored into the data module as a checkpoint's
            would be: the study validates and routes on the very clusters the adapters learnt,
            not on clusters computed again. ``None``: the data module's own (fine where they do
            not depend on the machine, e.g. one cluster per task).
    """

    def __init__(self, folder: str, datamodule_state: str | None = None) -> None:
        self.folder = Path(folder)
        self.datamodule_state = Path(datamodule_state) if datamodule_state else None
        if self.datamodule_state is not None and not self.datamodule_state.is_file():
            raise ValueError(
                f"LoadTrainedAdapters: datamodule_state={datamodule_state!r} does not exist"
            )
        if not (self.folder / "tclora_adapters.json").is_file():
            raise ValueError(
                f"LoadTrainedAdapters: folder={folder!r} is not an adapter export "
                "(no tclora_adapters.json)"
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from safetensors.torch import load_file

        if trainer.max_steps != 0:
            raise ValueError(
                f"LoadTrainedAdapters: trainer.max_steps={trainer.max_steps}; it loads finished "
                "adapters for a fit that trains nothing more, so max_steps must be 0"
            )
        names = list(getattr(pl_module, "adapter_names", []))
        manifest = json.loads((self.folder / "tclora_adapters.json").read_text())
        if manifest.get("adapters") != names:
            raise ValueError(
                f"LoadTrainedAdapters: {self.folder} holds adapters {manifest.get('adapters')}, "
                f"the module has {names}"
            )
        model = pl_module.model  # type: ignore[attr-defined]
        for name in names:
            weights = load_file(self.folder / name / "adapter_model.safetensors")
            misfit = (
                f"LoadTrainedAdapters: {self.folder / name} does not fit adapter {name!r} of "
                "the module (other modules, shapes or dtype)"
            )
            try:
                set_peft_model_state_dict(model, weights, adapter_name=name)
            except RuntimeError as err:  # torch's size mismatch
                raise ValueError(f"{misfit}: {str(err).splitlines()[1].strip()}") from None
            loaded = get_peft_model_state_dict(model, adapter_name=name)
            if loaded.keys() != weights.keys() or any(
                not loaded[k].cpu().equal(weights[k]) for k in weights
            ):
                raise ValueError(misfit)
        if hasattr(pl_module, "_adapter_steps") and "adapter_steps" in manifest:
            pl_module._adapter_steps = [int(s) for s in manifest["adapter_steps"]]
        if self.datamodule_state is not None:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is None:
                raise ValueError(
                    "LoadTrainedAdapters: datamodule_state is given but the fit has no data module"
                )
            datamodule.load_state_dict(load_datamodule_state(self.datamodule_state))


class PieceKeeper:
    """Keeps a running run's pieces: polls its folder every ``interval`` seconds in a thread, and
    copies into the :class:`Piece` (committing when ``commit``) the trained adapters once they are
    exported, then the study's progress when it changed (at most every ``progress_every`` s).

    Use as a context manager around the run's subprocess; leaving it polls once more, with no
    wait for the progress.
    """

    def __init__(
        self,
        piece: Piece,
        identity: dict[str, Any],
        earlier: list[float],
        commit: bool,
        interval: float = 30.0,
        progress_every: float = PROGRESS_EVERY,
    ) -> None:
        self.piece, self.identity, self.earlier, self.commit = piece, identity, earlier, commit
        self.interval, self.progress_every = interval, progress_every
        self.start = time.perf_counter()
        self._adapters_kept = piece.has_adapters()
        self._adapters_committed = self._adapters_kept
        self._refused = False  # exported by another tclora source than the identity names
        self._progress_sha = sha256_file(piece.progress) if piece.progress.is_file() else None
        self._progress_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PieceKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.poll(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as err:  # never kill the run for a piece: say it, try again
                print(f"[piece] {self.piece}: {type(err).__name__}: {err}", file=sys.stderr)

    def _attempts(self) -> list[float]:
        return [*self.earlier, time.perf_counter() - self.start]

    def poll(self, final: bool = False) -> None:
        """Keep (and commit) whatever finished since the last poll."""
        piece = self.piece
        trained = piece.run / TRAINED
        exported = trained / "tclora_adapters.json"
        if not self._adapters_kept and not self._refused and exported.is_file():
            made_by = json.loads(exported.read_text()).get("tclora_source")
            if made_by != self.identity["tclora_source"]:
                self._refused = True
                print(
                    f"[piece] {piece}: adapters not kept: the fit ran tclora source "
                    f"{str(made_by)[:12]}, not the {self.identity['tclora_source'][:12]} this "
                    "sweep started with (tclora/ edited while it ran); this session's record "
                    "still lands if the run ends, but a later session would fit it afresh",
                    file=sys.stderr,
                    flush=True,
                )
                return
            piece.save_adapters(trained, self.identity, self._attempts())
            self._adapters_kept = True
            print(f"[piece] {piece}: adapters kept in {piece.folder}", flush=True)
        if self._adapters_kept and not self._adapters_committed and self.commit:
            self._adapters_committed = commit_paths(
                [piece.folder], f"Sweep piece: {piece}, trained adapters (the study goes on)"
            )
        progress = piece.run / "merge" / piece.progress.name
        due = final or time.perf_counter() - self._progress_at >= self.progress_every
        if not (self._adapters_kept and progress.is_file() and due):
            return
        sha = sha256_file(progress)
        if sha == self._progress_sha:
            return
        rows = len(json.loads(progress.read_text()).get("rows", []))
        shutil.copy2(progress, piece.progress.with_name(".progress.tmp"))
        piece.progress.with_name(".progress.tmp").replace(piece.progress)
        piece.write_meta(attempts=self._attempts())
        self._progress_sha, self._progress_at = sha, time.perf_counter()
        if self.commit:
            commit_paths(
                [piece.progress, piece.meta],
                f"Sweep piece: {piece}, {rows} study row{'' if rows == 1 else 's'} done",
            )
