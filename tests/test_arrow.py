"""The merge study's ``arrow`` reference is peft's own Arrow model on the study's adapters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, randomize_lora
from peft import ArrowConfig, LoraConfig, create_arrow_model, get_peft_model

from tclora.evaluation import EvalExample, EvalSet
from tclora.merge import AdapterStack
from tclora.study import (
    StudyConfig,
    evaluate_sets,
    lm_loss,
    results_table,
    run_study,
    study_metrics,
    to_markdown,
)
from tclora.study.arrow import arrow_top_k, build_arrow_model

ADAPTERS = ["u", "v", "w"]  # not letters of "lora_" (peft warns of those)


def _peft(vocab: int, ranks: tuple[int, ...] = (2, 2, 2)) -> Any:
    model = None
    for name, r in zip(ADAPTERS, ranks, strict=True):
        config = LoraConfig(r=r, lora_alpha=4, target_modules=["q_proj", "v_proj"])
        if model is None:
            model = get_peft_model(build_tiny_llama(vocab, seed=1), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    randomize_lora(model, seed=5)
    return model.eval()


def _sets() -> list[EvalSet]:
    choices = ("red", "green", "blue", "yellow")
    mc = [
        EvalExample(f"Question {i}: which colour?", (choices[i % 4],), choices, "colours")
        for i in range(6)
    ]
    em = [EvalExample("Say yes.", ("yes",), None, "echo")]
    return [
        EvalSet("colours", "multiple_choice", mc, "colours.jsonl"),
        EvalSet("echo", "exact_match", em, "echo.jsonl"),
    ]


def _loaders(vocab: int) -> list[list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (2, 12), generator=gen)
    return [[{"input_ids": ids, "labels": ids.clone()}]]


def _peft_arrow(model: Any, vocab: int, folder: Path, top_k: int, temperature: float = 1.0) -> Any:
    """peft's Arrow model built by hand: adapter folders and a fresh base model."""
    model.save_pretrained(folder, selected_adapters=ADAPTERS)
    config = ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    arrow = create_arrow_model(
        build_tiny_llama(vocab, seed=1), [str(folder / a) for a in ADAPTERS], config
    )
    return arrow.eval()


def test_arrow_row_equals_peft_arrow_model(
    tokenizer: Any, tmp_path: Path, one_thread: None
) -> None:
    vocab = len(tokenizer)
    model = _peft(vocab)
    model.set_adapter("v")
    ids = torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = model(input_ids=ids).logits

    cfg = StudyConfig(
        cp_ranks=[2],
        rules=["mean_loading"],
        baselines=["uniform"],
        references=["arrow"],
        arrow_top_k=2,  # not peft's defaults (3, 1.0): the options reach peft
        arrow_temperature=0.5,
        cp_iters=5,
        chat_template=False,
        max_new_tokens=2,
        progress=False,
    )
    sets, loaders = _sets(), _loaders(vocab)
    stack = AdapterStack.from_peft_model(model, ADAPTERS)
    result = run_study(model, tokenizer, stack, cfg=cfg, val_loaders=loaders, eval_sets=sets)
    assert [r.name for r in result.rows] == ["arrow", "cp2_mean_loading", "uniform"]
    row = result.row("arrow")
    assert row.kind == "reference"
    metrics = study_metrics(result)  # what TensorBoard gets
    assert metrics["merge/arrow/colours/acc"] == row.scores["colours"]["acc"]
    assert metrics["merge/arrow/selection"] == row.selection
    assert "| arrow |" in to_markdown(results_table(result))

    # the study's model is as it was: same adapters, active adapter, outputs
    assert list(model.peft_config) == ADAPTERS
    assert model.active_adapter == "v"
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)

    assert arrow_top_k(3) == 3 and arrow_top_k(2) == 2
    direct = _peft_arrow(model, vocab, tmp_path / "adapters", top_k=2, temperature=0.5)
    ours = build_arrow_model(model, ADAPTERS, top_k=2, router_temperature=0.5, rng_seed=cfg.seed)
    with torch.no_grad():
        expected = direct(input_ids=ids).logits
        torch.testing.assert_close(ours(input_ids=ids).logits, expected)
        # Arrow really mixes: neither the base model nor any single adapter gives its logits
        with model.disable_adapter():
            assert (model(input_ids=ids).logits - expected).abs().max() > 1e-3
        for name in ADAPTERS:
            model.set_adapter(name)
            assert (model(input_ids=ids).logits - expected).abs().max() > 1e-4

    # same scorer, same items, same numbers
    assert row.scores == evaluate_sets(direct, tokenizer, sets, cfg)
    assert row.scores["colours"]["n"] == 6 and row.scores["echo"]["n"] == 1
    # per-item headline correctness, for paired comparisons between rows
    for name in ("colours", "echo"):
        assert len(row.items[name]) == row.scores[name]["n"] and set(row.items[name]) <= {"0", "1"}
        assert row.items[name].count("1") == round(row.primary(name) * row.scores[name]["n"])
    assert result.row("uniform").items.keys() == row.items.keys()
    assert 0.0 <= row.scores["colours"]["acc"] <= 1.0
    assert row.selection is not None and math.isfinite(row.selection)
    assert row.selection == pytest.approx(lm_loss(direct, loaders[0], None), rel=1e-6)


def test_arrow_errors(tokenizer: Any, one_thread: None) -> None:
    vocab = len(tokenizer)
    model = _peft(vocab, ranks=(2, 4, 2))
    cfg = StudyConfig(
        cp_ranks=[2], rules=["mean_loading"], baselines=[], references=["arrow"], progress=False
    )
    stack = AdapterStack.from_peft_model(model, ADAPTERS)
    with pytest.raises(  # the study refuses them before its first row
        ValueError,
        match=r"references include 'arrow', which needs adapters of one LoRA rank .*"
        r"\{'u': 2, 'v': 4, 'w': 2\}",
    ):
        run_study(model, tokenizer, stack, cfg=cfg)
    with pytest.raises(
        ValueError,
        match=r"adapters=\['u', 'v', 'w'\]: peft's Arrow refuses them \(task_0 = u, task_1 = v, "
        r"task_2 = w\): \[task_1\] rank mismatch: 4 != 2\. Arrow needs every adapter with the "
        r"same LoRA rank, shapes and target modules",
    ):
        build_arrow_model(model, ADAPTERS, top_k=2)
    assert list(model.peft_config) == ADAPTERS  # the model keeps its adapters

    with pytest.raises(
        ValueError, match=r"top_k=3: must be an integer from 1 to the number of adapters, 2"
    ):
        build_arrow_model(model, ["u", "w"], top_k=3)
    with pytest.raises(ValueError, match=r"top_k=0: must be an integer from 1"):
        build_arrow_model(model, ["u", "w"], top_k=0)
    with pytest.raises(ValueError, match=r"router_temperature=0\.0: must be > 0"):
        build_arrow_model(model, ["u", "w"], top_k=1, router_temperature=0.0)
    with pytest.raises(
        ValueError, match=r"adapters=\['u', 'z'\]: \['z'\] are not adapters of the model"
    ):
        build_arrow_model(model, ["u", "z"], top_k=1)
    with pytest.raises(ValueError, match=r"adapters=\[\]: Arrow routes between one or more"):
        build_arrow_model(model, [], top_k=1)
    with pytest.raises(ValueError, match=r"arrow_top_k=4: Arrow mixes at most the 3 adapters"):
        run_study(model, tokenizer, stack, cfg=StudyConfig(**{**cfg.__dict__, "arrow_top_k": 4}))
    with pytest.raises(ValueError, match=r"arrow_top_k=0: must be an integer >= 1"):
        StudyConfig(arrow_top_k=0)
    with pytest.raises(ValueError, match=r"arrow_temperature=0: must be a finite number > 0"):
        StudyConfig(arrow_temperature=0)
    with pytest.raises(
        ValueError,
        match=r"references='arrows': expected one of \['base', 'single', 'routing', 'arrow'\]",
    ):
        StudyConfig(references=["arrows"])  # type: ignore[list-item]


def test_the_prototype_benchmark_computes_the_exact_vector_and_peft_s() -> None:
    """``benchmarks/arrow_prototypes.py``: the exact top right singular vector of ``B A`` (from
    a QR of ``Aᵀ``) is the dense SVD's, and peft's power iteration reaches it given the steps."""
    from benchmarks.arrow_prototypes import exact_top_right, power_top_right

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 24, generator=g), torch.randn(16, 4, generator=g)
    v, ratio = exact_top_right(a, b)
    _, s, vh = torch.linalg.svd(b.double() @ a.double())
    assert abs(float(v @ vh[0])) == pytest.approx(1.0, abs=1e-10)
    assert ratio == pytest.approx(float(s[1] / s[0]), rel=1e-10)
    assert abs(float(power_top_right(a, b, iters=500).double() @ v)) == pytest.approx(1.0, abs=1e-5)
