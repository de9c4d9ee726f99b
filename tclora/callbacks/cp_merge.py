r"""
CP Merge
========

At the end of a fit, merge the LoRA adapters of the module's peft model through a joint Canonical
Polyadic decomposition of their deltas, compare the merge with baseline merges and references on
held-out evaluation sets, log everything, and export the kept merge as a standard peft adapter.

Works on any ``LightningModule`` that holds a ``peft.PeftModel`` with two or more LoRA adapters.
The study itself (:class:`~tclora.study.MergeStudy`) knows nothing of Lightning; this callback
finds the model, gathers the validation batches and the router, calls the study and logs its
results through ``trainer.loggers``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.callback import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from tclora._dist import zero_stage
from tclora._io import check_writable
from tclora.study import (
    Baseline,
    CPRule,
    MergeSpace,
    MergeStudy,
    MethodResult,
    Reference,
    Router,
    SelectionMetric,
    StudyConfig,
    StudyResult,
    log_study,
    row_from_dict,
    row_to_dict,
)
from tclora.study.study import MERGED_ADAPTER_DIR

__all__ = ["CPMergeCallback", "find_peft_model"]

_DEFAULTS = StudyConfig()
"""The study's defaults: the callback's signature shows them (``tclora fit --help``) and has no
others."""


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


class CPMergeCallback(Callback):
    r"""Merge a peft model's LoRA adapters at fit end: joint CP, baselines, evaluation, export.

    Every merge method gets its own scale, chosen on validation data (the data module's
    validation loaders, one per cluster) by ``selection_metric``; held-out evaluation sets are
    only ever reported. Results are logged through ``trainer.loggers`` and written as CSV, Markdown
    and JSON to ``output_dir``; the kept merge is exported as a peft adapter folder. A study
    interrupted mid-way resumes from ``output_dir`` only if it is the very same study (same
    adapters, base model, options, evaluation and validation data, code): see
    :mod:`tclora.study.progress`.

    Args:
        cp_ranks: CP rank (or ranks) of the joint decomposition.
        engine: ``"factored"`` (CP-ALS from the LoRA factors, never building a delta),
            ``"core"`` (the same ALS on the small core tensor, mapped back) or ``"dense"``
            (tensorly ``parafac`` on the stacked deltas, the reference).
        rules: CP merge rules to compare.
        baselines: Baseline merges to compare (``cart``, ``dare_linear``, ``dare_ties``,
            ``magnitude_prune`` too).
        merge_space: Where the baselines merge: ``"core"`` (on the adapters' core matrices,
            exact and fast; the Core Space paper's variants of TIES/DARE), ``"knots"`` (KnOTS
            basis) or ``"full"`` (peft's functions on dense deltas, then truncated).
        scales: Grid of merge scales; each method's scale is chosen on validation data (a
            warning says when a method chose the smallest or largest scale it tried).
        scale_extensions: How many times a merge whose best scale is the grid's smallest or
            largest may try one more scale beyond it (the grid's outer ratio further out), so
            that the chosen scale ends inside the tried range; 0 keeps the grid as given.
        eval_sets: Held-out evaluation sets: ``registry:<task>`` or local JSONL paths.
        eval_max_items: Items per evaluation set (seeded subsample); ``None`` for all.
        selection_metric: ``"val_loss"`` (mean validation loss over clusters) or
            ``"val_loss_max"`` (the worst cluster's), lower is better.
        val_max_batches: Validation batches per cluster when choosing scales.
        adapters: Regular expression selecting the adapters to merge (default: all LoRA adapters).
        references: References to evaluate beside the merges: ``"base"`` (adapters off),
            ``"single"`` (each adapter), ``"routing"`` (each example with the adapter of its
            nearest cluster centroid; needs a data module with ``embed``, ``assign`` and
            ``cluster_names``), ``"arrow"`` (peft's Arrow router over the adapters: every token
            to its ``arrow_top_k`` best-aligned adapters).
        keep: Merge kept as the result: ``"best"`` by ``selection_metric``, or a method name such
            as ``"cp4_sum_components"``.
        output_dir: Folder for tables, figures and exports (default ``<log_dir>/merge``: the
            logger's version folder, so every run has its own).
        export: Export the kept merge as a peft adapter folder (``<output_dir>/merged_adapter``).
        tokenizer: Tokenizer name or folder; default the module's or data module's ``tokenizer``.
        batch_size: Evaluation batch size.
        max_length: Maximum tokens per evaluation sequence.
        max_new_tokens: Generation length for exact-match sets.
        fold_adapter: Score each adapter or merge with it added into the base weights (no LoRA
            work per token; the base weights are restored bit-exactly after each set; a copy of
            the adapted weights is held meanwhile). Scores differ by float rounding only.
        chat_template: Render evaluation prompts with the tokenizer's chat template.
        cp_iters: Maximum CP-ALS sweeps.
        cp_tol: CP-ALS convergence tolerance.
        density: Kept fraction for the TIES / DARE / magnitude-pruning baselines (the CP rule
            ``ties_loading`` keeps half of each component's loadings, whatever this is).
        cart_rank: CART's kept fraction of each task's deviation rank.
        arrow_top_k: Adapters Arrow mixes per token (``None``: peft's default 3, or every
            adapter when there are fewer).
        arrow_temperature: Softmax temperature of Arrow's routing coefficients (peft: 1.0).
        single_sets: For the ``"single"`` reference, the evaluation sets (by name: the file's
            stem) each adapter is scored on, e.g. ``{cluster_0: [sarcasm]}`` when every adapter
            has one home task; adapters not named (or ``None``) are scored on every set.
        seed: Seed of the CP initialisation, DARE and evaluation subsampling.
        progress: Show progress bars during evaluation (one log line per method and scale is
            written either way).
    """

    def __init__(
        self,
        cp_ranks: int | list[int] = _DEFAULTS.cp_ranks[0],
        engine: Literal["factored", "dense", "core"] = _DEFAULTS.engine,
        rules: Sequence[CPRule] = tuple(_DEFAULTS.rules),
        baselines: Sequence[Baseline] = tuple(_DEFAULTS.baselines),
        merge_space: MergeSpace = _DEFAULTS.merge_space,
        scales: Sequence[float] = tuple(_DEFAULTS.scales),
        scale_extensions: int = _DEFAULTS.scale_extensions,
        eval_sets: Sequence[str] = tuple(_DEFAULTS.eval_sets),
        eval_max_items: int | None = _DEFAULTS.eval_max_items,
        selection_metric: SelectionMetric = _DEFAULTS.selection_metric,
        val_max_batches: int | None = _DEFAULTS.val_max_batches,
        adapters: str | None = _DEFAULTS.adapters,
        references: Sequence[Reference] = tuple(_DEFAULTS.references),
        keep: str = _DEFAULTS.keep,
        output_dir: str | None = None,
        export: bool = _DEFAULTS.export,
        tokenizer: str | None = None,
        batch_size: int = _DEFAULTS.batch_size,
        max_length: int = _DEFAULTS.max_length,
        max_new_tokens: int = _DEFAULTS.max_new_tokens,
        fold_adapter: bool = _DEFAULTS.fold_adapter,
        chat_template: bool = _DEFAULTS.chat_template,
        cp_iters: int = _DEFAULTS.cp_iters,
        cp_tol: float = _DEFAULTS.cp_tol,
        density: float = _DEFAULTS.density,
        cart_rank: float = _DEFAULTS.cart_rank,
        arrow_top_k: int | None = _DEFAULTS.arrow_top_k,
        arrow_temperature: float = _DEFAULTS.arrow_temperature,
        single_sets: dict[str, list[str]] | None = _DEFAULTS.single_sets,
        seed: int = _DEFAULTS.seed,
        progress: bool = _DEFAULTS.progress,
    ) -> None:
        config = StudyConfig.from_options(
            cp_ranks=cp_ranks,
            engine=engine,
            rules=rules,
            baselines=baselines,
            merge_space=merge_space,
            scales=scales,
            scale_extensions=scale_extensions,
            eval_sets=eval_sets,
            eval_max_items=eval_max_items,
            selection_metric=selection_metric,
            val_max_batches=val_max_batches,
            adapters=adapters,
            references=references,
            keep=keep,
            export=export,
            batch_size=batch_size,
            max_length=max_length,
            max_new_tokens=max_new_tokens,
            fold_adapter=fold_adapter,
            chat_template=chat_template,
            cp_iters=cp_iters,
            cp_tol=cp_tol,
            density=density,
            cart_rank=cart_rank,
            arrow_top_k=arrow_top_k,
            arrow_temperature=arrow_temperature,
            single_sets=single_sets,
            seed=seed,
            progress=progress,
        )
        self.study = MergeStudy(config)
        self.output_dir = output_dir
        self.tokenizer_name = tokenizer
        self.finished = False
        self._resumed: tuple[str, list[MethodResult]] | None = None
        self._tokenizer: Any = None
        self._out_dir: Path | None = None

    @property
    def config(self) -> StudyConfig:
        """The study's options."""
        return self.study.config

    @property
    def result(self) -> StudyResult | None:
        """The study's result after fit end (``None`` before)."""
        return self.study.result

    # ------------------------------------------------------------------ hooks
    def check(self, trainer: pl.Trainer, datamodule: Any = None) -> None:
        """Checks that need no model: a strategy that keeps whole parameters on each rank,
        evaluation sets load, output folder writable, K >= 2.

        ``tclora fit`` calls it before the data module embeds anything; :meth:`setup` calls it
        again (it is cheap and idempotent) for projects that use the callback alone.

        Args:
            trainer: The trainer (its log folder gives the default output folder).
            datamodule: The data module, when the trainer does not hold it yet.

        Raises:
            ValueError: A strategy that shards parameters (FSDP, DeepSpeed ZeRO stage 3), a
                missing or malformed evaluation set (file and line named), a data module with
                fewer than 2 clusters, or one without validation samples (``val_fraction=0``)
                where ``scales`` or ``keep="best"`` choose on validation loss.
            PermissionError: The output folder cannot be written.
        """
        check_strategy(trainer.strategy)
        if len(self.study.eval_sets) != len(self.config.eval_sets):
            self.study.load_eval_sets()
        check_writable(self.resolve_output_dir(trainer), "CPMergeCallback.output_dir")
        datamodule = datamodule if datamodule is not None else getattr(trainer, "datamodule", None)
        val_fraction = getattr(datamodule, "val_fraction", None)
        if isinstance(val_fraction, int | float) and val_fraction == 0:
            self.config.check_validation(
                False,
                f"the data module has val_fraction={val_fraction} (no validation samples); set "
                "data.val_fraction > 0",
                prefix="CPMergeCallback.",
            )
        k = getattr(datamodule, "num_clusters", None) if datamodule is not None else None
        if isinstance(k, int) and k < 2:
            raise ValueError(
                f"CPMergeCallback needs 2 or more adapters to merge, but the data module makes "
                f"num_clusters={k}; use 2 or more clusters or remove the callback"
            )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check(trainer)
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    # TensorBoard shows one hparams record per run: Lightning's placeholder
                    # (hp_metric = -1 at fit start) would hide the one log_study writes with the
                    # merge's metrics at fit end
                    logger._default_hp_metric = False

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        peft_model = find_peft_model(pl_module)
        self.study.adapter_names(peft_model)  # 2 or more, else a ValueError before training
        self._tokenizer = self._find_tokenizer(trainer, pl_module, peft_model)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        export = getattr(pl_module, "export_trained_adapters", None)
        if callable(export):
            export()  # before the study: a study that fails must not lose the trained adapters
        peft_model = find_peft_model(pl_module)
        if self._tokenizer is None:
            self._tokenizer = self._find_tokenizer(trainer, pl_module, peft_model)
        out_dir = self.resolve_output_dir(trainer)
        self._out_dir = out_dir
        # the strategy's teardown, which runs before on_fit_end, has put the module on the CPU
        device = trainer.strategy.root_device
        rank_zero_info(f"CPMergeCallback: merge study on {device}")
        with on_device(peft_model, device):
            result = self.study.run(
                peft_model,
                self._tokenizer,
                out_dir=out_dir,
                val_loaders=self._val_loaders(trainer),
                router=self._router(trainer, self.study.adapter_names(peft_model)),
                is_global_zero=trainer.is_global_zero,
                resumed=self._resumed,
            )
        self.finished = True
        if trainer.is_global_zero:
            if trainer.loggers:
                log_study(trainer.loggers, trainer.global_step, result, self.config)
            else:
                rank_zero_warn(
                    f"CPMergeCallback: the trainer has no logger; results are written to "
                    f"{out_dir} only"
                )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.study.fingerprint,
            "finished": self.finished,
            "done_rows": [row_to_dict(r) for r in self.study.rows],
            # how the merges were built: tclora export --fold rebuilds one as the study did
            "merge_options": self.config.merge_options(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fingerprint = state_dict.get("fingerprint")
        rows = [row_from_dict(r) for r in state_dict.get("done_rows", [])]
        # rows are reused only if the study's fingerprint at fit end is the same
        self._resumed = (str(fingerprint), rows) if fingerprint else None

    # ---------------------------------------------------------------- helpers
    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """``output_dir``, or ``<log_dir>/merge`` (``<default_root_dir>/merge`` without logger)."""
        if self.output_dir is not None:
            return Path(self.output_dir)
        return Path(trainer.log_dir or trainer.default_root_dir) / "merge"

    def summary_lines(self) -> list[str]:
        """Where this run's merge results are (for the CLI's closing message); empty before."""
        if not self.finished or self._out_dir is None:
            return []
        lines = [f"  merge results:    {self._out_dir / 'results.md'}"]
        if (self._out_dir / MERGED_ADAPTER_DIR).is_dir():
            lines.append(f"  merged adapter:   {self._out_dir / MERGED_ADAPTER_DIR}")
        if self.result is not None and self.result.kept:
            lines.append(f"  kept merge:       {self.result.kept}")
        return lines

    def _find_tokenizer(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, peft_model: Any
    ) -> Any:
        from transformers import AutoTokenizer

        from tclora.assets import resolve_model

        if self.tokenizer_name is not None:
            return AutoTokenizer.from_pretrained(resolve_model(self.tokenizer_name))
        for owner in (pl_module, getattr(trainer, "datamodule", None)):
            tokenizer = getattr(owner, "tokenizer", None)
            if tokenizer is not None:
                return tokenizer
        name = str(peft_model.get_base_model().config._name_or_path or "")
        try:
            return AutoTokenizer.from_pretrained(resolve_model(name))
        except Exception as err:  # noqa: BLE001 -- re-raised with what to do
            raise ValueError(
                f"CPMergeCallback needs a tokenizer: none was given (tokenizer=None), neither the "
                f"module nor the data module has a `tokenizer`, and the base model's name "
                f"{name!r} does not load as one ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}). Pass "
                "CPMergeCallback(tokenizer=<folder or hub id>)"
            ) from None

    def _val_loaders(self, trainer: pl.Trainer) -> list[Iterable[Mapping[str, Any]]]:
        datamodule = getattr(trainer, "datamodule", None)
        loaders: Any = None
        if datamodule is not None and hasattr(datamodule, "val_dataloader"):
            try:
                loaders = datamodule.val_dataloader()
            except (MisconfigurationException, NotImplementedError):  # no val_dataloader
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

    def _router(self, trainer: pl.Trainer, names: Sequence[str]) -> Router | None:
        if "routing" not in self.config.references:
            return None
        datamodule = getattr(trainer, "datamodule", None)
        if not isinstance(datamodule, Router):
            rank_zero_info(
                "CPMergeCallback: the data module cannot route (it needs embed, assign and "
                "cluster_names): routing skipped"
            )
            return None
        cluster_names = list(datamodule.cluster_names)
        if not set(cluster_names) <= set(names):
            rank_zero_info(
                f"CPMergeCallback: clusters {cluster_names} are not all among the merged adapters "
                f"{list(names)}: routing skipped"
            )
            return None
        return datamodule


def check_strategy(strategy: Any) -> None:
    """Refuse a strategy that shards parameters: the merge study reads every adapter's whole
    weights and evaluates the whole model on each rank.

    Args:
        strategy: The trainer's strategy.

    Raises:
        ValueError: ``FSDPStrategy``, or ``DeepSpeedStrategy`` at ZeRO stage 3.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    name = None
    if isinstance(strategy, FSDPStrategy):
        name = "FSDPStrategy"
    elif zero_stage(strategy) == 3:
        name = "DeepSpeedStrategy(stage=3)"
    if name is not None:
        raise ValueError(
            f"CPMergeCallback cannot run under {name}: it shards the parameters, and the merge "
            "study needs every adapter's whole weights and the whole model on each rank. Train "
            "without the callback (LoRAModule still exports the adapters to model.export_dir), "
            "then merge them with `tclora merge --adapters <export_dir>/cluster_* --model "
            "<model> --merge <the callback's init_args as YAML>` on one GPU; or train under DDP "
            "or DeepSpeed stage 2, which keep whole parameters"
        )


@contextmanager
def on_device(module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run a block with ``module`` on ``device``, and put it back where it was afterwards.

    Lightning's strategies move the LightningModule to the CPU in ``teardown``, which runs before
    ``on_fit_end``; without this the merge study of a GPU run would evaluate on the CPU (and a
    multi-GPU study would hand NCCL CPU tensors).

    Args:
        module: The model the block uses.
        device: Where the block runs.

    Yields:
        Nothing; ``module`` is on ``device`` inside the block.
    """
    first = next(module.parameters(), None)
    original = first.device if first is not None else device
    if original == device:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to(original)
        if device.type == "cuda":
            torch.cuda.empty_cache()
