"""What a person sees of a study: progress lines, grid-edge warnings, the readable table, the
methods x sets figure, the loadings ticks, the projector's labels and the embedding bar."""

from __future__ import annotations

import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import build_tiny_llama
from peft import LoraConfig, get_peft_model

from tclora.merge import AdapterStack
from tclora.study import MethodResult, StudyConfig, run_study
from tclora.study.results import (
    display_name,
    loadings_figure,
    methods_figure,
    summary_table,
    to_text,
)


def _peft() -> Any:
    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_llama(64, seed=1), config, adapter_name="a")
    model.add_adapter("b", config)
    return model


def _loaders() -> list[list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    loaders = []
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 8), generator=gen)
        loaders.append([{"input_ids": ids, "labels": ids.clone()}])
    return loaders


class _Router:
    """Routes nothing (no eval sets here); loader k belongs to adapter k."""

    cluster_names = ["a", "b"]

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.zeros((len(texts), 2), np.float32)

    def assign(self, embeddings: np.ndarray) -> np.ndarray:
        return np.zeros(len(embeddings), np.int64)


def test_study_says_each_step_with_seconds_and_warns_at_the_grid_edge(
    caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    """Before: nothing between "merging N adapters" and "kept merge" (18 silent minutes in a
    busy demo), and no word when every merge chose the top of the scale grid."""
    model = _peft()
    stack = AdapterStack.from_peft_model(model, ["a", "b"])
    cfg = StudyConfig(
        cp_ranks=[2],
        rules=["mean_loading"],
        baselines=["uniform"],
        scales=[1e-6, 2e-6],  # tiny scales: the validation loss falls towards the larger one
        references=["base", "single", "routing"],
        cp_iters=5,
        progress=False,
    )
    with caplog.at_level(logging.INFO, logger="tclora"), pytest.warns(UserWarning) as warned:
        result = run_study(
            model, object(), stack, cfg=cfg, val_loaders=_loaders(), router=_Router()
        )
    log = caplog.text
    assert re.search(r"merge study: building 2 merges of 2 adapters", log)
    assert re.search(
        r"merges built in [\d.]+ s \(cp2_mean_loading [\d.]+ s, uniform [\d.]+ s\)", log
    )
    names = ["base", "single:a", "single:b", "routing", "cp2_mean_loading", "uniform"]
    assert [r.name for r in result.rows] == names
    for i, name in enumerate(names, start=1):
        assert re.search(
            rf"\[{i}/6\] {re.escape(name)}( at scale [\de.-]+)? done in [\d.]+ s; "
            r"val loss [\d.]+",
            log,
        ), name
        row = result.row(name)
        assert row.selection is not None and math.isfinite(row.selection)
    for scale in ("1e-06", "2e-06"):
        assert re.search(
            rf"\[5/6\] cp2_mean_loading at scale {scale}: val loss [\d.]+ \([\d.]+ s\)", log
        )
    # routing's validation loss: each cluster's batches through its own adapter
    singles = [result.row("single:a"), result.row("single:b")]
    assert result.row("routing").selection != singles[0].selection
    chosen = {r.name: r.scale for r in result.rows if r.kind == "merge"}
    at_top = [n for n, s in chosen.items() if s == 2e-6]
    messages = [str(w.message) for w in warned]
    assert all(r.scale_at_edge for r in result.rows if r.kind == "merge")  # a 2-point grid
    if at_top:
        named = ", ".join(f"{n} (2e-06)" for n in at_top)
        assert (
            f"merge study: {len(at_top)} of 2 merges chose the largest scale they tried, grid "
            f"[1e-06, 2e-06] ({named}): a larger scale may be better; extend the scales or "
            "raise scale_extensions"
        ) in messages
    at_bottom = [n for n, s in chosen.items() if s == 1e-6]
    if at_bottom:
        assert any("chose the smallest scale they tried" in m for m in messages)


@pytest.mark.parametrize(("extensions", "chosen", "tried"), [(3, 8.0, 5), (1, 4.0, 3), (0, 2.0, 2)])
def test_scale_extensions_carry_the_search_past_the_grid_edge(
    monkeypatch: pytest.MonkeyPatch, extensions: int, chosen: float, tried: int
) -> None:
    """Validation loss (log2 s − 3)², lowest at 8, on the grid [1, 2]: each extension tries the
    next scale out (×2, the grid's ratio) until the best one is inside what was tried."""
    import tclora.study.run as run_module

    last: list[float] = []
    real_install = run_module.install_adapter

    def install(model: Any, name: str, merged: Any) -> None:
        last.append(merged.scale)
        real_install(model, name, merged)

    monkeypatch.setattr(run_module, "install_adapter", install)
    monkeypatch.setattr(
        run_module, "_validation_metric", lambda *a, **k: (math.log2(last[-1]) - 3) ** 2
    )
    model = _peft()
    stack = AdapterStack.from_peft_model(model, ["a", "b"])
    cfg = StudyConfig(
        cp_ranks=[2],
        rules=[],
        baselines=["uniform"],
        scales=[1.0, 2.0],
        scale_extensions=extensions,
        references=[],
        progress=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        row = run_study(model, object(), stack, cfg=cfg, val_loaders=_loaders()).row("uniform")
    assert row.scale == chosen and len(row.scale_curve) == tried
    assert row.scale_at_edge is (extensions < 3)
    assert row.norm_ratio == pytest.approx(chosen, rel=1e-4)  # uniform at scale s: s × the mean
    with pytest.raises(ValueError, match=r"scale_extensions=-1: must be an integer >= 0"):
        StudyConfig(scale_extensions=-1)


def _merge(name: str, scale: float, selection: float, scores: Any, *report: float) -> Any:
    seconds, norm, cosine = report
    return MethodResult(
        name,
        "merge",
        scale=scale,
        selection=selection,
        scale_curve={"1.0": 0.4, "2.0": 0.35, "4.0": 0.3},
        scores=scores,
        merge_seconds=seconds,
        norm=norm,
        cosine_to_sum=cosine,
    )


def _rows() -> list[MethodResult]:
    def scores(a: float, b: float) -> dict[str, dict[str, float]]:
        return {"food": {"acc": a, "n": 60}, "regex": {"exact_match": b, "n": 60}}

    return [
        MethodResult("base", "reference", selection=2.65, scores=scores(0.2, 0.8)),
        MethodResult("single:cluster_0", "reference", selection=0.5, scores=scores(0.3, 0.7)),
        MethodResult("single:cluster_1", "reference", selection=0.6, scores=scores(0.8, 0.8)),
        MethodResult("routing", "reference", selection=0.31, scores=scores(0.8, 0.75)),
        _merge("cp4_mean_loading", 4.0, 0.3, scores(0.8, 0.7), 0.94, 2.85, 0.7513),
        _merge("knots_ties", 2.0, 0.33, scores(0.75, 0.6), 12.0, 6.0, 0.8),
    ]


def test_display_names() -> None:
    assert [display_name(r.name) for r in _rows()] == [
        "base model",
        "single adapter cluster_0",
        "single adapter cluster_1",
        "centroid routing",
        "CP rank 4, mean_loading",
        "KnOTS-TIES",
    ]
    assert display_name("iso_c") == "Iso-C" and display_name("something_new") == "something_new"


def test_summary_table_marks_the_kept_merge_and_the_grid_edge() -> None:
    """Before: the kept row was not marked, nothing said a scale was the grid's edge, and the
    TensorBoard table wrapped mid-word; now a fixed-width text table that never wraps."""
    table = summary_table(_rows(), ["food", "regex"], "cp4_mean_loading")
    assert list(table[0]) == [
        "method",
        "food",
        "regex",
        "average",
        "chosen scale",
        "val loss",
        "‖ΔW‖",
        "cos to Σ ΔW",
        "merge s",
    ]
    kept = table[4]
    assert kept["method"] == "CP rank 4, mean_loading (kept)"
    assert kept["chosen scale"] == "4 (grid max)" and table[5]["chosen scale"] == "2"
    assert (kept["food"], kept["regex"], kept["average"]) == ("0.800", "0.700", "0.750")
    assert (kept["val loss"], kept["‖ΔW‖"], kept["cos to Σ ΔW"], kept["merge s"]) == (
        "0.300",
        "2.85",
        "0.75",
        "0.9",
    )
    assert table[1]["val loss"] == "0.500"  # references have a selection metric now
    text = to_text(table).splitlines()
    assert len({len(line) for line in text[:2]}) == 1
    assert text[0].split()[:3] == ["method", "food", "regex"]
    assert text[6].startswith("CP rank 4, mean_loading (kept)  0.800  0.700")
    best = summary_table(_rows(), ["food", "regex"], None, best_single_only=True)
    assert [r["method"] for r in best][:3] == [
        "base model",
        "best single adapter (cluster_1)",
        "centroid routing",
    ]
    # single adapters scored on their own set only (single_sets): no average compares them, so
    # they become one row holding each set's own adapter (before: the first adapter, all NaN)
    rows = _rows()
    for r in rows:
        if r.name.startswith("single:"):
            keep = "food" if r.name.endswith("cluster_0") else "regex"
            r.scores = {keep: r.scores[keep]}
    own = summary_table(rows, ["food", "regex"], None, best_single_only=True)
    assert [r["method"] for r in own][:3] == [
        "base model",
        "single adapters (each on its own sets)",
        "centroid routing",
    ]
    singles = {r.name: r for r in rows if r.name.startswith("single:")}
    food = singles["single:cluster_0"].primary("food")
    regex = singles["single:cluster_1"].primary("regex")
    assert (own[1]["food"], own[1]["regex"]) == (f"{food:.3f}", f"{regex:.3f}")
    assert own[1]["average"] == f"{(food + regex) / 2:.3f}"


def test_methods_figure_and_integer_loading_ticks() -> None:
    rows = _rows()
    fig = methods_figure(rows, ["food", "regex"], "knots_ties")
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[-1] == "KnOTS-TIES (kept)" and labels[0] == "base model"
    assert ax.get_yticklabels()[-1].get_fontweight() == "bold"
    assert ax.get_yticklabels()[0].get_fontstyle() == "italic"
    assert len(ax.patches) == 2 * len(rows)  # one bar per method and set
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["average", "food", "regex"]
    # before: fractional ticks (0.5, 1.5, ...) at 2-3 components
    heat = np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    fig = loadings_figure({"cp3": {"heatmap": heat, "adapters": ["a", "b"]}})
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert ticks == ["1", "2", "3"]


def test_projector_labels_points_by_cluster_name(tmp_path: Path) -> None:
    """The cluster column holds text (cluster_k), first: the projector labels by it and colours
    it by category."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from tclora.datamodules.reporting import log_cluster_statistics

    logger = TensorBoardLogger(tmp_path, name="tb")
    emb = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    clusters = np.array([0, 0, 1, 1, 2, 2])
    tasks = ["x", "x", "y", "y", "z", "z"]
    log_cluster_statistics(
        [logger],
        {"clusters/purity": 1.0},
        {"tasks_per_cluster": [{"x": 2}, {"y": 2}, {"z": 2}]},
        np.zeros((3, 4), np.float32),
        lambda: (emb, clusters, tasks),
        "clusters",
    )
    logger.experiment.flush()
    lines = next(Path(logger.log_dir).rglob("metadata.tsv")).read_text().splitlines()
    assert lines[0] == "cluster\ttask"
    assert lines[1:] == [f"cluster_{c}\t{t}" for c, t in zip(clusters, tasks, strict=True)]


@pytest.mark.parametrize(("texts", "bar"), [(4, False), (5, True), (60, True)])
def test_embedding_bar_whenever_more_than_one_batch(
    texts: int, bar: bool, multitask_jsonl: Path
) -> None:
    """Before: a bar only above 10 batches (640 texts by default), though 2 batches take
    seconds on a CPU."""
    from tclora.datamodules import ClusterDataModule

    seen: list[bool] = []

    class _Encoder:
        def encode(self, batch: list[str], **kwargs: Any) -> np.ndarray:
            seen.append(kwargs["show_progress_bar"])
            return np.ones((len(batch), 3), np.float32)

    dm = ClusterDataModule(sources=[str(multitask_jsonl)], embed_batch_size=4, progress_bar=True)
    dm._encoder = _Encoder()
    assert dm.embed(["t"] * texts).shape == (texts, 3)
    assert seen == [bar]
