"""MergeStudy: the whole merge study on a peft model, without Lightning's trainer.

It validates its options (:class:`~tclora.study.StudyConfig`), loads the evaluation sets, checks
the progress of an earlier run against this run's fingerprint, runs the study
(:func:`~tclora.study.run.run_study`), writes the results (CSV, Markdown, JSON, loadings figure)
and exports the kept merge as a peft adapter folder. :class:`~tclora.callbacks.CPMergeCallback`
calls it at fit end; ``tclora merge`` calls it on saved adapter folders.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from tclora._io import atomic_write, atomic_write_text
from tclora.evaluation import EvalSet, EvalSetError, load_any_eval_set
from tclora.merge import AdapterStack, export_adapter
from tclora.study.config import StudyConfig, check_single_sets
from tclora.study.progress import (
    fingerprint_components,
    read_progress,
    retire_outputs,
    study_fingerprint,
    write_progress,
)
from tclora.study.results import (
    MethodResult,
    StudyResult,
    loadings_figure,
    results_table,
    study_summary,
    to_csv,
    to_markdown,
)
from tclora.study.run import Router, has_validation_data, run_study

__all__ = ["MergeStudy", "lora_adapter_names"]

MERGED_ADAPTER_DIR = "merged_adapter"


def lora_adapter_names(peft_model: Any, pattern: str | None = None) -> list[str]:
    """LoRA adapters of ``peft_model`` whose name matches ``pattern`` (``re.search``), in order."""
    from peft import LoraConfig

    names = [n for n, c in peft_model.peft_config.items() if isinstance(c, LoraConfig)]
    if pattern is not None:
        names = [n for n in names if re.search(pattern, n)]
    return names


class MergeStudy:
    """Merge a peft model's LoRA adapters every configured way, evaluate, write, export.

    Args:
        config: The study's options.
    """

    def __init__(self, config: StudyConfig) -> None:
        self.config = config
        self.eval_sets: list[EvalSet] = []
        self.result: StudyResult | None = None
        self.fingerprint: str | None = None
        self.rows: list[MethodResult] = []

    def load_eval_sets(self) -> list[EvalSet]:
        """Load and validate the configured evaluation sets (call it before the work).

        ``registry:<task>`` and JSONL paths load with :func:`~tclora.evaluation.load_eval_set`;
        ``lm_eval:<task>`` and ``lm_eval:<path>.yaml`` through lm-eval's task manager
        (:func:`~tclora.evaluation.load_harness_task`; the ``tclora[harness]`` extra), which
        reads the task's data now, so a missing task or dataset fails before any model work.

        Raises:
            EvalSetError: A set cannot be loaded, or two sets have the same name (their scores
                would overwrite each other in the table).
            ValueError: ``single_sets`` names a set that is not loaded.
        """
        cfg = self.config
        sets = [
            load_any_eval_set(source, max_items=cfg.eval_max_items, seed=cfg.seed)
            for source in cfg.eval_sets
        ]
        names = [es.name for es in sets]
        for name in sorted({n for n in names if names.count(n) > 1}):
            sources = [es.source for es in sets if es.name == name]
            raise EvalSetError(
                f"eval_sets: {sources} are all named {name!r}; every evaluation set needs its own "
                "name (rename a file, or drop one)"
            )
        if "single" in cfg.references:
            check_single_sets(cfg.single_sets, eval_sets=names)
        self.eval_sets = sets
        return self.eval_sets

    def adapter_names(self, peft_model: Any) -> list[str]:
        """The adapters this study merges; at least 2, else ``ValueError``."""
        names = lora_adapter_names(peft_model, self.config.adapters)
        if len(names) < 2:
            raise ValueError(
                f"CPMergeCallback needs 2 or more LoRA adapters to merge; found {len(names)} "
                f"({names}) with adapters={self.config.adapters!r}"
            )
        if "single" in self.config.references:
            check_single_sets(self.config.single_sets, adapters=names)
        return names

    def run(
        self,
        peft_model: Any,
        tokenizer: Any,
        *,
        out_dir: Path,
        val_loaders: Sequence[Iterable[Mapping[str, Any]]] = (),
        router: Router | None = None,
        is_global_zero: bool = True,
        resumed: tuple[str, Sequence[MethodResult]] | None = None,
    ) -> StudyResult:
        """Run the study on ``peft_model`` and write its results and export to ``out_dir``.

        Rows finished by an earlier run are reused only when that run's fingerprint equals this
        one's (:mod:`tclora.study.progress`); otherwise the study starts afresh and the earlier
        run's files are moved into a ``stale-*`` folder, and a warning says why.

        Args:
            peft_model: The peft model holding the adapters.
            tokenizer: Its tokenizer.
            out_dir: Folder for tables, figures, progress and the exported merge.
            val_loaders: Validation batches per cluster, for choosing each method's scale.
            router: Routes evaluation examples to adapters (centroid routing), or ``None``.
            is_global_zero: Whether this process writes files and messages.
            resumed: ``(fingerprint, rows)`` restored from a checkpoint, reused on a match.

        Returns:
            The study's result (also kept as ``self.result``).
        """
        cfg = self.config
        cfg.check_validation(has_validation_data(val_loaders), "pass validation data")
        if cfg.eval_sets and len(self.eval_sets) != len(cfg.eval_sets):
            self.load_eval_sets()
        names = self.adapter_names(peft_model)
        stack = AdapterStack.from_peft_model(peft_model, names)
        components = fingerprint_components(
            stack=stack,
            model=peft_model,
            tokenizer=tokenizer,
            cfg=cfg,
            eval_sets=self.eval_sets,
            val_loaders=val_loaders,
            routing=router is not None,
        )
        self.fingerprint = study_fingerprint(components)
        done = self._reusable_rows(out_dir, components, resumed, is_global_zero)
        if is_global_zero:
            rank_zero_info(
                f"merge study: merging {len(names)} adapters ({', '.join(names)}); methods "
                f"{cfg.method_names}; scales {cfg.scales}; outputs in {out_dir}"
            )
        self.rows = list(done)

        def save_progress(row: MethodResult) -> None:
            self.rows.append(row)
            if is_global_zero:
                write_progress(out_dir, components, self.rows)

        result = run_study(
            peft_model,
            tokenizer,
            stack,
            cfg=cfg,
            val_loaders=val_loaders,
            eval_sets=self.eval_sets,
            router=router,
            done=done,
            on_row=save_progress,
        )
        self.result = result
        if is_global_zero:
            self.write_outputs(result, out_dir, stack)
        return result

    def _reusable_rows(
        self,
        out_dir: Path,
        components: Mapping[str, Any],
        resumed: tuple[str, Sequence[MethodResult]] | None,
        is_global_zero: bool,
    ) -> list[MethodResult]:
        if resumed is not None and resumed[0] == self.fingerprint and resumed[1]:
            rank_zero_info(f"merge study: resuming {len(resumed[1])} rows from the checkpoint")
            return list(resumed[1])
        rows, reason = read_progress(out_dir, components)
        if rows:
            rank_zero_info(
                f"merge study: resuming, {len(rows)} rows of this very study already done in "
                f"{out_dir} (fingerprint {self.fingerprint and self.fingerprint[:12]})"
            )
            return rows
        if reason is not None and is_global_zero:
            moved = retire_outputs(out_dir)
            rank_zero_warn(
                f"merge study: not resuming: {reason}. Starting afresh; the earlier files were "
                f"moved to {moved}"
            )
        return []

    def write_outputs(self, result: StudyResult, out_dir: Path, stack: AdapterStack) -> None:
        """Write ``results.{csv,md,json}``, ``cp_loadings.png`` and the kept merge's adapter."""
        table = results_table(result)
        atomic_write_text(out_dir / "results.csv", to_csv(table))
        atomic_write_text(out_dir / "results.md", to_markdown(table))
        summary = study_summary(result, adapters=stack.names, fingerprint=self.fingerprint)
        atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=1))
        if result.loadings:
            figure = loadings_figure(result.loadings)
            atomic_write(
                out_dir / "cp_loadings.png",
                lambda handle: figure.savefig(handle, format="png", dpi=110),
                binary=True,
            )
        if self.config.export and result.kept is not None:
            path = export_adapter(
                result.merged(result.kept), out_dir / MERGED_ADAPTER_DIR, stack.lora_config
            )
            rank_zero_info(f"merge study: kept merge {result.kept!r} exported to {path}")
