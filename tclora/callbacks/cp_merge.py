r"""
CP Merge
========

At the end of a fit, merge the LoRA adapters of the module's peft model through a joint Canonical
Polyadic decomposition of their deltas, compare the merge with baseline merges and references on
held-out evaluation sets, log everything, and export the kept merge as a standard peft adapter.

Works on any ``LightningModule`` that holds a ``peft.PeftModel`` with two or more LoRA adapters.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from tclora._io import atomic_write_text
from tclora.evaluation import EvalSet, load_eval_set
from tclora.merge import AdapterStack, export_adapter
from tclora.merge_study import (
    Baseline,
    CPRule,
    MethodResult,
    Reference,
    SelectionMetric,
    StudyConfig,
    StudyResult,
    results_table,
    row_from_dict,
    row_to_dict,
    run_study,
    to_csv,
    to_markdown,
)

_PROGRESS = "merge_progress.json"


def find_peft_model(pl_module: pl.LightningModule) -> Any:
    """Return the ``PeftModel`` inside ``pl_module`` (its ``model`` attribute, or the first found).

    Raises:
        ValueError: If the module holds no peft model.
    """
    from peft import PeftModel

    candidate = getattr(pl_module, "model", None)
    if isinstance(candidate, PeftModel):
        return candidate
    for module in pl_module.modules():
        if isinstance(module, PeftModel):
            return module
    raise ValueError(
        f"CPMergeCallback needs a peft PeftModel with 2 or more LoRA adapters inside the "
        f"LightningModule; {type(pl_module).__name__} holds none"
    )


def lora_adapter_names(peft_model: Any, pattern: str | None = None) -> list[str]:
    """LoRA adapters of ``peft_model`` whose name matches ``pattern`` (``re.search``), in order."""
    from peft import LoraConfig

    names = [n for n, c in peft_model.peft_config.items() if isinstance(c, LoraConfig)]
    if pattern is not None:
        names = [n for n in names if re.search(pattern, n)]
    return names


def loadings_figure(loadings: Mapping[str, Any]) -> Any:
    """A heatmap of the CP task loadings (adapters x components), one panel per CP rank."""
    from matplotlib.figure import Figure  # no pyplot: the caller's backend stays untouched

    panels = [(label, np.asarray(data["heatmap"])) for label, data in loadings.items()]
    fig = Figure(figsize=(4.5 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), squeeze=False)
    for ax, (label, heat) in zip(axes[0], panels, strict=True):
        if float(heat.min()) >= 0:  # shares of each component (c_tq^2): sequential scale
            image = ax.imshow(heat, cmap="viridis", vmin=0.0, aspect="auto")
            ax.set_title(f"{label}: share of each component per adapter")
        else:
            limit = float(np.abs(heat).max()) or 1.0
            image = ax.imshow(heat, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            ax.set_title(f"{label}: task loadings")
        ax.set_xlabel("CP component (by decreasing weight)")
        ax.set_ylabel("adapter")
        names = loadings[label].get("adapters")
        if names:
            ax.set_yticks(range(len(names)), names)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


class CPMergeCallback(Callback):
    r"""Merge a peft model's LoRA adapters at fit end: joint CP, baselines, evaluation, export.

    Every merge method gets its own scale, chosen on validation data (the data module's
    validation loaders, one per cluster) by ``selection_metric``; held-out evaluation sets are
    only ever reported. Results are logged through ``trainer.loggers`` and written as CSV, Markdown
    and JSON to ``output_dir``; the kept merge is exported as a peft adapter folder.

    Args:
        cp_ranks: CP rank (or ranks) of the joint decomposition.
        engine: ``"factored"`` (CP-ALS from the LoRA factors, never building a delta) or
            ``"dense"`` (tensorly ``parafac`` on the stacked deltas, the reference).
        rules: CP merge rules to compare.
        baselines: Dense merge baselines to compare.
        scales: Grid of merge scales; each method's scale is chosen on validation data.
        eval_sets: Held-out evaluation sets: ``registry:<task>`` or local JSONL paths.
        eval_max_items: Items per evaluation set (seeded subsample); ``None`` for all.
        selection_metric: ``"val_loss"`` (mean validation loss over clusters) or
            ``"val_loss_max"`` (the worst cluster's), lower is better.
        val_max_batches: Validation batches per cluster when choosing scales.
        adapters: Regular expression selecting the adapters to merge (default: all LoRA adapters).
        references: References to evaluate beside the merges: ``"base"`` (adapters off),
            ``"single"`` (each adapter), ``"routing"`` (each example with the adapter of its
            nearest cluster centroid; needs a data module with ``embed`` and ``assign``).
        keep: Merge kept as the result: ``"best"`` by ``selection_metric``, or a method name such
            as ``"cp4_sum_components"``.
        output_dir: Folder for tables, figures and exports (default ``<log_dir>/merge``).
        export: Export the kept merge as a peft adapter folder (``<output_dir>/merged_adapter``).
        tokenizer: Tokenizer name or folder; default the module's or data module's ``tokenizer``.
        batch_size: Evaluation batch size.
        max_length: Maximum tokens per evaluation sequence.
        max_new_tokens: Generation length for exact-match sets.
        chat_template: Render evaluation prompts with the tokenizer's chat template.
        cp_iters: Maximum CP-ALS sweeps.
        cp_tol: CP-ALS convergence tolerance.
        density: Kept fraction for TIES / DARE / magnitude pruning.
        seed: Seed of the CP initialisation, DARE and evaluation subsampling.
        progress: Show progress bars during evaluation.
    """

    def __init__(
        self,
        cp_ranks: int | list[int] = 4,
        engine: Literal["factored", "dense"] = "factored",
        rules: list[CPRule] | None = None,
        baselines: list[Baseline] | None = None,
        scales: list[float] | None = None,
        eval_sets: list[str] | None = None,
        eval_max_items: int | None = 200,
        selection_metric: SelectionMetric = "val_loss",
        val_max_batches: int | None = 8,
        adapters: str | None = None,
        references: list[Reference] | None = None,
        keep: str = "best",
        output_dir: str | None = None,
        export: bool = True,
        tokenizer: str | None = None,
        batch_size: int = 8,
        max_length: int = 512,
        max_new_tokens: int = 16,
        chat_template: bool = True,
        cp_iters: int = 100,
        cp_tol: float = 1e-8,
        density: float = 0.2,
        seed: int = 0,
        progress: bool = True,
    ) -> None:
        ranks = [cp_ranks] if isinstance(cp_ranks, int) else list(cp_ranks)
        if not ranks or any(not isinstance(r, int) or r < 1 for r in ranks):
            raise ValueError(f"cp_ranks={cp_ranks!r}: every CP rank must be an integer >= 1")
        _check_choice("engine", engine, ("factored", "dense"))
        rules = ["sum_components", "mean_loading"] if rules is None else list(rules)
        baselines = (
            ["uniform", "ties", "knots_ties", "tsv", "iso_c"]
            if baselines is None
            else list(baselines)
        )
        references = ["base", "single", "routing"] if references is None else list(references)
        for rule in rules:
            _check_choice("rules", rule, get_args(CPRule))
        for method in baselines:
            _check_choice("baselines", method, get_args(Baseline))
        for ref in references:
            _check_choice("references", ref, get_args(Reference))
        _check_choice("selection_metric", selection_metric, get_args(SelectionMetric))
        if not rules and not baselines:
            raise ValueError(
                "rules=[] and baselines=[]: nothing to merge; name at least one method"
            )
        scales = [1.0] if scales is None else [float(s) for s in scales]
        if not scales or any(not math.isfinite(s) or s <= 0 for s in scales):
            raise ValueError(f"scales={scales!r}: give one or more finite scales > 0")
        for name, value in (
            ("eval_max_items", eval_max_items),
            ("val_max_batches", val_max_batches),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1 or None")
        for name, value in (
            ("batch_size", batch_size),
            ("max_length", max_length),
            ("max_new_tokens", max_new_tokens),
            ("cp_iters", cp_iters),
        ):
            if value < 1:
                raise ValueError(f"{name}={value!r}: must be >= 1")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density={density!r}: must be in (0, 1]")
        if adapters is not None:
            try:
                re.compile(adapters)
            except re.error as err:
                raise ValueError(
                    f"adapters={adapters!r} is not a valid regular expression: {err}"
                ) from err
        method_names = [f"cp{r}_{rule}" for r in ranks for rule in rules] + baselines
        if keep != "best" and keep not in method_names:
            raise ValueError(f"keep={keep!r}: expected 'best' or one of {method_names}")

        self.config = StudyConfig(
            cp_ranks=ranks,
            engine=engine,
            rules=rules,
            baselines=baselines,
            scales=scales,
            selection_metric=selection_metric,
            references=references,
            val_max_batches=val_max_batches,
            batch_size=batch_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            chat_template=chat_template,
            cp_iters=cp_iters,
            cp_tol=cp_tol,
            seed=seed,
            density=density,
            progress=progress,
        )
        self.eval_set_sources = list(eval_sets or [])
        self.eval_max_items = eval_max_items
        self.adapters = adapters
        self.keep = keep
        self.output_dir = output_dir
        self.export = export
        self.tokenizer_name = tokenizer
        self.finished = False
        self.done_rows: list[MethodResult] = []
        self.result: StudyResult | None = None
        self._eval_sets: list[EvalSet] = []

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peft_model = find_peft_model(pl_module)
        names = lora_adapter_names(peft_model, self.adapters)
        if len(names) < 2:
            raise ValueError(
                f"CPMergeCallback needs 2 or more LoRA adapters to merge; found {len(names)} "
                f"({names}) with adapters={self.adapters!r}"
            )
        # Loading the evaluation sets here makes a missing or malformed file fail before training.
        self.load_eval_sets()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.finished:
            rank_zero_info("CPMergeCallback: the merge study of this run is already finished")
            return
        if not self._eval_sets and self.eval_set_sources:
            self.load_eval_sets()
        peft_model = find_peft_model(pl_module)
        names = lora_adapter_names(peft_model, self.adapters)
        self.run(
            peft_model,
            self._tokenizer(trainer, pl_module, peft_model),
            out_dir=self.resolve_output_dir(trainer),
            val_loaders=self._val_loaders(trainer),
            router=self._router(trainer, names),
            is_global_zero=trainer.is_global_zero,
            loggers=trainer.loggers,
            step=trainer.global_step,
        )

    def run(
        self,
        peft_model: Any,
        tokenizer: Any,
        *,
        out_dir: Path,
        val_loaders: Sequence[Iterable[Mapping[str, Any]]] = (),
        router: Any = None,
        is_global_zero: bool = True,
        loggers: Sequence[Logger] = (),
        step: int = 0,
    ) -> StudyResult:
        """Run the merge study on ``peft_model`` and write, log and export its results.

        This is what ``on_fit_end`` does, without a trainer: ``tclora merge`` calls it on adapters
        loaded from folders.

        Args:
            peft_model: The peft model holding the adapters.
            tokenizer: Its tokenizer.
            out_dir: Folder for tables, figures, progress and the exported merge.
            val_loaders: Validation batches per cluster, for choosing each method's scale.
            router: Maps evaluation sets to per-example adapters (centroid routing), or ``None``.
            is_global_zero: Whether this process writes files and logs.
            loggers: Lightning loggers to log to.
            step: Step at which metrics are logged.

        Returns:
            The study's result (also kept as ``self.result``).
        """
        names = lora_adapter_names(peft_model, self.adapters)
        if len(names) < 2:
            raise ValueError(
                f"CPMergeCallback needs 2 or more LoRA adapters to merge; found {len(names)} "
                f"({names}) with adapters={self.adapters!r}"
            )
        stack = AdapterStack.from_peft_model(peft_model, names)
        done = self.done_rows or self._read_progress(out_dir)
        rank_zero_info(
            f"CPMergeCallback: merging {len(names)} adapters ({', '.join(names)}); "
            f"methods {self._method_names()}; scales {self.config.scales}"
        )
        self.done_rows = list(done)

        def save_progress(row: MethodResult) -> None:
            self.done_rows.append(row)
            if is_global_zero:
                payload = json.dumps([row_to_dict(r) for r in self.done_rows], indent=1)
                atomic_write_text(out_dir / _PROGRESS, payload)

        result = run_study(
            peft_model,
            tokenizer,
            stack,
            cfg=self.config,
            val_loaders=val_loaders,
            eval_sets=self._eval_sets,
            router=router,
            keep=self.keep,
            done=done,
            on_row=save_progress,
        )
        self.result = result
        if is_global_zero:
            self._write_outputs(result, out_dir, stack)
            self._log(loggers, step, result, out_dir)
        self.finished = True
        return result

    def load_eval_sets(self) -> list[EvalSet]:
        """Load (and validate) the configured evaluation sets."""
        self._eval_sets = [
            load_eval_set(source, max_items=self.eval_max_items, seed=self.config.seed)
            for source in self.eval_set_sources
        ]
        return self._eval_sets

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"finished": self.finished, "done_rows": [row_to_dict(r) for r in self.done_rows]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.finished = bool(state_dict.get("finished", False))
        self.done_rows = [row_from_dict(r) for r in state_dict.get("done_rows", [])]

    # ---------------------------------------------------------------- helpers
    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """``output_dir``, or ``<log_dir>/merge`` (``<default_root_dir>/merge`` without logger)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "merge"

    def _method_names(self) -> list[str]:
        cfg = self.config
        return [f"cp{r}_{rule}" for r in cfg.cp_ranks for rule in cfg.rules] + list(cfg.baselines)

    def _tokenizer(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, peft_model: Any
    ) -> Any:
        if self.tokenizer_name is not None:
            from transformers import AutoTokenizer

            from tclora.assets import resolve_model

            return AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_name))
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            tokenizer = getattr(owner, "tokenizer", None)
            if tokenizer is not None:
                return tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(peft_model.get_base_model().config._name_or_path)

    def _val_loaders(self, trainer: pl.Trainer) -> list[Iterable[Mapping[str, Any]]]:
        datamodule = getattr(trainer, "datamodule", None)
        loaders: Any = None
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            try:
                loaders = datamodule.val_dataloader()
            except Exception:  # noqa: BLE001 -- a data module without validation data
                loaders = None
        if loaders is None:
            loaders = trainer.val_dataloaders
        if loaders is None:
            return []
        if isinstance(loaders, Mapping):
            return list(loaders.values())
        if isinstance(loaders, Sequence):
            return list(loaders)
        return [loaders]

    def _router(self, trainer: pl.Trainer, names: Sequence[str]) -> Any:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not all(
            hasattr(datamodule, a) for a in ("embed", "assign", "cluster_names")
        ):
            if "routing" in self.config.references:
                rank_zero_info("CPMergeCallback: no data module with embed/assign: routing skipped")
            return None
        cluster_names = list(datamodule.cluster_names)
        if not set(cluster_names) <= set(names):
            rank_zero_info(
                f"CPMergeCallback: clusters {cluster_names} are not all among the merged adapters "
                f"{list(names)}: routing skipped"
            )
            return None

        def route(eval_sets: Sequence[EvalSet]) -> dict[str, list[str]]:
            from tclora.data import prompt_text

            routes = {}
            for es in eval_sets:
                texts = [prompt_text(ex.prompt) for ex in es.examples]
                ids = datamodule.assign(datamodule.embed(texts)) if texts else []
                routes[es.name] = [cluster_names[int(i)] for i in ids]
            return routes

        return route

    def _read_progress(self, out_dir: Path) -> list[MethodResult]:
        path = out_dir / _PROGRESS
        if not path.is_file():
            return []
        rows = [row_from_dict(r) for r in json.loads(path.read_text())]
        rank_zero_info(f"CPMergeCallback: resuming, {len(rows)} rows already done in {path}")
        return rows

    def _write_outputs(self, result: StudyResult, out_dir: Path, stack: AdapterStack) -> None:
        table = results_table(result)
        atomic_write_text(out_dir / "results.csv", to_csv(table))
        atomic_write_text(out_dir / "results.md", to_markdown(table))
        summary = {
            "kept": result.kept,
            "eval_sets": result.eval_sets,
            "rows": [row_to_dict(r) for r in result.rows],
            "cp_fit_error": result.cp_fit_error,
            "adapters": stack.names,
        }
        atomic_write_text(out_dir / "results.json", json.dumps(summary, indent=1))
        if result.loadings:
            loadings_figure(result.loadings).savefig(out_dir / "cp_loadings.png", dpi=110)
        if self.export and result.kept is not None:
            path = export_adapter(
                result.merged(result.kept), out_dir / "merged_adapter", stack.lora_config
            )
            rank_zero_info(f"CPMergeCallback: kept merge {result.kept!r} exported to {path}")

    def _log(
        self, loggers: Sequence[Logger], step: int, result: StudyResult, out_dir: Path
    ) -> None:
        if not loggers:
            rank_zero_warn(
                f"CPMergeCallback: the trainer has no logger; results are written to {out_dir} only"
            )
            return
        metrics: dict[str, float] = {}
        for row in result.rows:
            for name in result.eval_sets:
                for key, value in row.scores.get(name, {}).items():
                    if key != "n":
                        metrics[f"merge/{row.name}/{name}/{key}"] = value
            metrics[f"merge/{row.name}/average"] = row.average(result.eval_sets)
            for key in ("scale", "selection", "merge_seconds", "norm", "cosine_to_sum"):
                value = getattr(row, key)
                if value is not None:
                    metrics[f"merge/{row.name}/{key}"] = float(value)
        for label, summary in result.cp_fit_error.items():
            for key, value in summary.items():
                metrics[f"merge/{label}/fit_error_{key}"] = value
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        markdown = to_markdown(results_table(result))
        kept_avg = result.row(result.kept).average(result.eval_sets) if result.kept else math.nan
        hparams = {
            "merge/cp_ranks": str(self.config.cp_ranks),
            "merge/engine": self.config.engine,
            "merge/kept": str(result.kept),
            "merge/scales": str(self.config.scales),
            "merge/selection_metric": self.config.selection_metric,
        }
        for logger in loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                writer = logger.experiment
                writer.add_text("merge/results", markdown, global_step=step)
                if result.loadings:
                    writer.add_figure("merge/cp_loadings", loadings_figure(result.loadings), step)
            if math.isfinite(kept_avg):
                logger.log_hyperparams(hparams, metrics={"merge/kept_average": kept_avg})
            else:
                logger.log_hyperparams(hparams)
            logger.save()


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: expected one of {list(allowed)}")
