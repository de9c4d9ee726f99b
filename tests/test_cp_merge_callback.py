"""CPMergeCallback on a plain user LightningModule (not tclora's) holding a 3-adapter peft model."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, deepspeed_strategy
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader

from tclora.callbacks import CPMergeCallback
from tclora.study import select_scale

ADAPTERS = ["task_x", "task_y", "task_z"]


class UserModule(LightningModule):
    """Somebody else's module: a peft model with several adapters, cycled by batch index."""

    def __init__(self, vocab_size: int, adapters: list[str] = ADAPTERS) -> None:
        super().__init__()
        base = build_tiny_llama(vocab_size, seed=1)
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        )
        torch.manual_seed(2)
        self.model = get_peft_model(base, config, adapter_name=adapters[0])
        for name in adapters[1:]:
            self.model.add_adapter(name, config)
        self.adapters = adapters

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.model.set_adapter(self.adapters[batch_idx % len(self.adapters)])
        return self.model(**batch).loss

    def validation_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.log("val_loss", self.model(**batch).loss, add_dataloader_idx=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        return torch.optim.SGD(params, lr=1e-2)


def _batches(vocab: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        out.append(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        )
    return out


class UserData(LightningDataModule):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def train_dataloader(self) -> Any:
        return DataLoader(_batches(self.vocab, 6, 0), batch_size=None)

    def val_dataloader(self) -> Any:
        return [DataLoader(_batches(self.vocab, 2, s), batch_size=None) for s in (1, 2)]


@pytest.fixture
def eval_files(tmp_path: Path) -> list[str]:
    mc = tmp_path / "colors.jsonl"
    mc.write_text(
        "".join(
            json.dumps(
                {"prompt": f"Is {w} a color?", "choices": ["yes", "no"], "answer": int(i % 2)}
            )
            + "\n"
            for i, w in enumerate(["red", "table", "blue", "chair", "green", "spoon"])
        )
    )
    em = tmp_path / "numbers.jsonl"
    em.write_text(
        "".join(json.dumps({"prompt": f"{i} + 1 =", "ideal": str(i + 1)}) + "\n" for i in range(4))
    )
    return [str(mc), str(em)]


def _callback(tmp_path: Path, eval_files: list[str], **overrides: Any) -> CPMergeCallback:
    kwargs: dict[str, Any] = dict(
        cp_ranks=[2],
        rules=["sum_components", "mean_loading"],
        baselines=["uniform", "ties"],
        scales=[0.5, 1.0, 3.0],
        eval_sets=eval_files,
        references=["base", "single"],
        output_dir=str(tmp_path / "merge"),
        batch_size=4,
        max_length=64,
        max_new_tokens=3,
        cp_iters=20,
        progress=False,
    )
    kwargs.update(overrides)
    return CPMergeCallback(**kwargs)


def _trainer(tmp_path: Path, callback: CPMergeCallback, logger: Any = True) -> Trainer:
    return Trainer(
        default_root_dir=tmp_path,
        max_steps=3,
        accelerator="cpu",
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=[callback],
    )


def test_merge_at_fit_end_on_a_user_module(
    tmp_path: Path, tokenizer: Any, eval_files: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    module = UserModule(len(tokenizer))
    module.tokenizer = tokenizer
    callback = _callback(tmp_path, eval_files)
    trainer = _trainer(tmp_path, callback)
    with caplog.at_level("INFO", logger="tclora"):
        trainer.fit(module, datamodule=UserData(len(tokenizer)))

    result = callback.result
    assert result is not None and callback.finished
    names = [row.name for row in result.rows]
    assert names == [
        "base",
        "single:task_x",
        "single:task_y",
        "single:task_z",
        "cp2_sum_components",
        "cp2_mean_loading",
        "uniform",
        "ties",
    ]
    merges = [row for row in result.rows if row.kind == "merge"]
    for row in merges:
        curve = {float(k): v for k, v in row.scale_curve.items()}
        assert set(curve) == {0.5, 1.0, 3.0}
        assert row.scale == select_scale(curve)
        assert row.selection == curve[row.scale]
        assert 0.0 <= row.scores["colors"]["acc"] <= 1.0
        assert row.scores["numbers"]["n"] == 4
        # every merge names its space, its LoRA rank and its truncation error (exact here)
        assert row.space == ("cp" if row.name.startswith("cp") else "core")
        assert row.rank is not None and 1 <= row.rank <= 12  # Σr = 3 adapters × r 4
        assert row.truncation_error is not None and row.truncation_error < 1e-6
    assert result.kept == min(merges, key=lambda r: r.selection or math.inf).name
    # the temporary merged adapter is gone and the active adapter is restored
    assert set(module.model.peft_config) == set(ADAPTERS)

    out = tmp_path / "merge"
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [r["method"] for r in table] == names
    assert "| method |" in (out / "results.md").read_text()
    assert (out / "cp_loadings.png").stat().st_size > 1000
    assert json.loads((out / "results.json").read_text())["kept"] == result.kept

    # the exported kept merge names its modules as peft does, loads, and reproduces the deltas
    merged_config = json.loads((out / "merged_adapter" / "adapter_config.json").read_text())
    assert sorted(merged_config["target_modules"]) == ["q_proj", "v_proj"]
    base = build_tiny_llama(len(tokenizer), seed=1)
    loaded = PeftModel.from_pretrained(base, out / "merged_adapter")
    kept = result.merged(result.kept)
    layer = loaded.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(
        layer.get_delta_weight("default"),
        kept.delta("model.layers.0.self_attn.q_proj").float(),
        rtol=1e-5,
        atol=1e-6,
    )

    # TensorBoard got scalars, the table and the loadings figure
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = Path(trainer.loggers[0].log_dir)
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    assert "merge/cp2_sum_components/colors/acc" in scalars
    assert "merge/cp2_fit_error_mean" in scalars or "merge/cp2/fit_error_mean" in scalars
    assert "merge/cp_loadings" in acc.Tags()["images"]
    assert any("merge/results" in tag for tag in acc.Tags()["tensors"])
    _check_tensorboard_views(run_dir, result, acc)
    _check_progress_lines(caplog.text, result)
    # every reference has a validation loss now (before: only base and the merges)
    assert all(row.selection is not None for row in result.rows)


def _check_tensorboard_views(run_dir: Path, result: Any, acc: Any) -> None:
    """The methods x sets bar chart, the readable table, the custom-scalars layout, and ONE
    hparams record holding the merge's options and metrics (before: a second record that
    TensorBoard ignored, and only hp_metric = -1)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.custom_scalar import layout_pb2
    from tensorboard.plugins.hparams import plugin_data_pb2

    image = acc.Images("merge/methods_x_eval_sets")[-1]
    assert image.width > 400 and image.height > 300
    text = acc.Tensors("merge/results/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "```" in text and f"{result.kept}" in text
    table = text.split("```")[1]
    kept_line = next(line for line in table.splitlines() if "(kept)" in line)
    assert len({len(line) for line in table.strip().splitlines()[:2]}) == 1  # aligned columns
    assert kept_line.split("  ")[0].strip().endswith("(kept)")

    starts, experiments, layouts = [], [], []
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.tag == "_hparams_/session_start_info":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    starts.append(data.session_start_info)
                elif value.tag == "_hparams_/experiment":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    experiments.append(data.experiment)
                elif value.tag == "custom_scalars__config__":
                    layouts.append(layout_pb2.Layout.FromString(value.tensor.string_val[0]))
    assert len(starts) == 1 and len(experiments) == 1, "one hparams record per run"
    assert starts[0].hparams["merge/kept"].string_value == result.kept
    assert starts[0].hparams["merge/scales"].string_value == "[0.5, 1.0, 3.0]"
    metric_names = {m.name.tag for m in experiments[0].metric_infos}
    assert {"merge/kept_average", "merge/kept_selection", "merge/base/average"} <= metric_names
    assert "hp_metric" not in metric_names
    kept_average = acc.Scalars("merge/kept_average")[-1].value
    assert kept_average == pytest.approx(result.row(result.kept).average(result.eval_sets))
    (layout,) = layouts
    charts = {chart.title for category in layout.category for chart in category.chart}
    assert {"average of every method", "colors: every method", "numbers: every method"} <= charts


def _check_progress_lines(log: str, result: Any) -> None:
    """The study's progress lines reach the log through the callback too (their content:
    tests/test_study_views.py)."""
    assert re.search(r"merge study: merges built in [\d.]+ s \(cp2_sum_components [\d.]+ s", log)
    last = result.rows[-1]
    assert re.search(rf"\[8/8\] {last.name} at scale [\d.]+: val loss [\d.]+ \([\d.]+ s\)", log)
    assert re.search(rf"\[8/8\] {last.name} at scale [\d.]+ done in [\d.]+ s: colors", log)


def test_no_logger_warns_and_still_writes_the_table(
    tmp_path: Path, tokenizer: Any, eval_files: list[str]
) -> None:
    module = UserModule(len(tokenizer))
    module.tokenizer = tokenizer
    callback = _callback(
        tmp_path,
        eval_files[:1],
        scales=[1.0],
        references=[],
        baselines=["uniform"],
        rules=["mean_loading"],
        export=False,
    )
    with pytest.warns(UserWarning, match="no logger; results are written to"):
        _trainer(tmp_path, callback, logger=False).fit(module, datamodule=UserData(len(tokenizer)))
    assert (tmp_path / "merge" / "results.csv").is_file()
    assert not (tmp_path / "merge" / "merged_adapter").exists()


def test_fewer_than_two_adapters_is_refused_before_training(tmp_path: Path, tokenizer: Any) -> None:
    module = UserModule(len(tokenizer), adapters=["only"])
    trainer = _trainer(tmp_path, _callback(tmp_path, []), logger=False)
    with pytest.raises(
        ValueError, match=r"needs 2 or more LoRA adapters to merge; found 1 \(\['only'\]\)"
    ):
        trainer.fit(module, datamodule=UserData(len(tokenizer)))
    assert trainer.global_step == 0


def test_a_data_module_without_validation_samples_is_refused_before_training(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Before: ``val_fraction=0`` gave empty validation loaders, and the study failed on NaN
    losses after the whole fit; with one scale the first merge was kept as 'best'."""

    class NoValidation(UserData):
        val_fraction = 0.0

    module = UserModule(len(tokenizer))
    trainer = _trainer(tmp_path, _callback(tmp_path, []), logger=False)
    with pytest.raises(
        ValueError,
        match=r"CPMergeCallback\.scales=\[0\.5, 1\.0, 3\.0\] \(one scale per merge\) and "
        r"CPMergeCallback\.keep='best' \(the merge to keep among \['cp2_sum_components', "
        r"'cp2_mean_loading', 'uniform', 'ties'\]\) are chosen on validation loss, and there is "
        r"no validation data: the data module has val_fraction=0\.0 \(no validation samples\); "
        r"set data\.val_fraction > 0, or give a single scale and name the merge to keep "
        r"\(CPMergeCallback\.keep=<method>\)",
    ):
        trainer.fit(module, datamodule=NoValidation(len(tokenizer)))
    assert trainer.global_step == 0
    named = _callback(tmp_path, [], scales=[1.0], keep="uniform")
    named.check(trainer, NoValidation(len(tokenizer)))  # nothing left to choose: allowed


def test_a_module_without_peft_model_is_refused(tmp_path: Path, tokenizer: Any) -> None:
    class Plain(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layer.weight.sum()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="needs a peft PeftModel .* Plain holds none"):
        _trainer(tmp_path, _callback(tmp_path, []), logger=False).fit(
            Plain(), datamodule=UserData(8)
        )


def test_missing_eval_set_fails_before_training(tmp_path: Path, tokenizer: Any) -> None:
    module = UserModule(len(tokenizer))
    trainer = _trainer(tmp_path, _callback(tmp_path, [str(tmp_path / "nope.jsonl")]), logger=False)
    with pytest.raises(ValueError, match="nope.jsonl"):
        trainer.fit(module, datamodule=UserData(len(tokenizer)))
    assert trainer.global_step == 0


def test_malformed_eval_set_names_file_and_line(tmp_path: Path, tokenizer: Any) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "ideal": "2"}\n{not json\n')
    module = UserModule(len(tokenizer))
    trainer = _trainer(tmp_path, _callback(tmp_path, [str(bad)]), logger=False)
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        trainer.fit(module, datamodule=UserData(len(tokenizer)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cp_ranks": 0}, r"cp_ranks=0: every CP rank must be an integer >= 1"),
        ({"cp_ranks": [4, -1]}, r"cp_ranks=\[4, -1\]"),
        ({"engine": "svd"}, r"engine='svd': expected one of \['factored', 'dense', 'core'\]"),
        ({"rules": ["median"]}, r"rules='median': expected one of \['sum_components'"),
        ({"baselines": ["avg"]}, r"baselines='avg': expected one of \['uniform'"),
        (
            {"references": ["oracle"]},
            r"references='oracle': expected one of \['base', 'single', 'routing', 'arrow'\]",
        ),
        (
            {"selection_metric": "test_acc"},
            r"selection_metric='test_acc': expected one of \['val_loss'",
        ),
        ({"scales": []}, r"scales=\[\]: give one or more finite scales > 0"),
        ({"scales": [1.0, -2.0]}, r"scales=\[1.0, -2.0\]"),
        ({"rules": [], "baselines": []}, r"nothing to merge"),
        ({"eval_max_items": 0}, r"eval_max_items=0: must be >= 1 or None"),
        ({"batch_size": 0}, r"batch_size=0: must be >= 1"),
        ({"density": 1.5}, r"density=1.5: must be in \(0, 1\]"),
        ({"cart_rank": 0.0}, r"cart_rank=0.0: must be in \(0, 1\]"),
        ({"merge_space": "tucker"}, r"merge_space='tucker': expected one of \['full', 'knots'"),
        ({"adapters": "("}, r"adapters='\(' is not a valid regular expression"),
        ({"keep": "cp9_sum_components"}, r"keep='cp9_sum_components': expected 'best' or one of"),
        ({"single_sets": {}}, r"single_sets=\{\}: expected \{adapter name: \[evaluation set"),
        ({"single_sets": {"a": []}}, r"single_sets=.*entry 'a': \[\]: expected"),
        ({"single_sets": {"a": [3]}}, r"single_sets=.*entry 'a': \[3\]: expected"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CPMergeCallback(**kwargs)


def test_single_sets_scores_an_adapter_on_its_own_sets_only(
    tmp_path: Path, tokenizer: Any, eval_files: list[str]
) -> None:
    """``single_sets`` restricts the ``single`` reference of the adapters it names (a per-task
    adapter on its own task); the others, and every merge, are scored on every set."""
    callback = _callback(
        tmp_path,
        eval_files,
        rules=["mean_loading"],
        baselines=["uniform"],
        scales=[1.0],
        references=["single"],
        single_sets={"task_x": ["colors"], "task_z": ["numbers"]},
        export=False,
    )
    module = UserModule(len(tokenizer))
    module.tokenizer = tokenizer
    _trainer(tmp_path, callback, logger=False).fit(module, datamodule=UserData(len(tokenizer)))
    assert callback.result is not None
    rows = {row.name: row for row in callback.result.rows}
    assert set(rows["single:task_x"].scores) == set(rows["single:task_x"].items) == {"colors"}
    assert set(rows["single:task_z"].scores) == {"numbers"}
    for name in ("single:task_y", "cp2_mean_loading", "uniform"):
        assert set(rows[name].scores) == {"colors", "numbers"}, name
    assert math.isnan(rows["single:task_x"].primary("numbers"))


@pytest.mark.parametrize(
    ("single_sets", "message"),
    [
        (
            {"task_q": ["colors"]},
            r"single_sets: adapters \['task_q'\] are not among the run's adapters "
            r"\['task_x', 'task_y', 'task_z'\]",
        ),
        (
            {"task_x": ["colours"]},
            r"single_sets: evaluation sets \['colours'\] are not among the loaded sets "
            r"\['colors', 'numbers'\]",
        ),
    ],
)
def test_single_sets_naming_unknown_adapters_or_sets_fails_before_training(
    tmp_path: Path, tokenizer: Any, eval_files: list[str], single_sets: Any, message: str
) -> None:
    callback = _callback(tmp_path, eval_files, single_sets=single_sets)
    trainer = _trainer(tmp_path, callback, logger=False)
    with pytest.raises(ValueError, match=message):
        trainer.fit(UserModule(len(tokenizer)), datamodule=UserData(len(tokenizer)))
    assert trainer.global_step == 0


def test_no_tokenizer_is_refused_before_training(tmp_path: Path, tokenizer: Any) -> None:
    """Before: an opaque `OSError: Repo id must use alphanumeric chars` after the whole fit."""
    module = UserModule(len(tokenizer))  # no `tokenizer` attribute; the base model has no name
    trainer = _trainer(tmp_path, _callback(tmp_path, []), logger=False)
    with pytest.raises(
        ValueError,
        match=r"CPMergeCallback needs a tokenizer: none was given \(tokenizer=None\), neither the "
        r"module nor the data module has a `tokenizer`, and the base model's name '' does not "
        r"load as one .* Pass CPMergeCallback\(tokenizer=<folder or hub id>\)",
    ):
        trainer.fit(module, datamodule=UserData(len(tokenizer)))
    assert trainer.global_step == 0


def test_resumed_rows_of_another_study_are_not_used(
    tmp_path: Path, tokenizer: Any, eval_files: list[str]
) -> None:
    """Rows restored from a checkpoint are reused only under the same fingerprint."""
    module = UserModule(len(tokenizer))
    module.tokenizer = tokenizer
    callback = _callback(
        tmp_path, eval_files[:1], scales=[1.0], references=[], baselines=["uniform"], rules=[]
    )
    fake = {"name": "uniform", "kind": "merge", "scale": 99.0, "scores": {"colors": {"acc": 1.0}}}
    callback.load_state_dict({"fingerprint": "0" * 64, "finished": True, "done_rows": [fake]})
    _trainer(tmp_path, callback, logger=False).fit(module, datamodule=UserData(len(tokenizer)))
    assert callback.result is not None
    (row,) = callback.result.rows
    assert row.scale == 1.0 and row.scores["colors"]["n"] == 6  # computed, not the fake row
    state = callback.state_dict()
    assert state["fingerprint"] == callback.study.fingerprint and state["finished"] is True
    assert [r["name"] for r in state["done_rows"]] == ["uniform"]


def test_callback_defaults_are_the_study_defaults() -> None:
    """One set of defaults: every option the callback passes on defaults to StudyConfig's, and
    the signature shows the real values (no ``None`` standing for a list)."""
    import dataclasses
    import inspect

    from tclora.study import StudyConfig

    study = StudyConfig()
    fields = {f.name for f in dataclasses.fields(StudyConfig)}
    checked = []
    for name, param in inspect.signature(CPMergeCallback.__init__).parameters.items():
        if name in fields:
            default = param.default
            expected = getattr(study, name)
            if isinstance(expected, list):
                assert isinstance(default, tuple | int), name  # immutable, and shown in --help
                default = [default] if isinstance(default, int) else list(default)
            assert default == expected, name
            checked.append(name)
    assert {"rules", "baselines", "scales", "references", "cp_ranks"} <= set(checked)
    assert CPMergeCallback().config == study


def test_strategies_that_shard_parameters_are_refused_before_training() -> None:
    """FSDP and ZeRO-3 shard the parameters: the study, which reads whole adapters and evaluates
    the whole model, is refused at setup (the H100 run of benchmarks/gpu_strategies.py crashed at
    fit end instead) with the two-step way named; DDP and ZeRO-2 keep whole parameters."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    from tclora.callbacks.cp_merge import check_strategy

    with pytest.raises(ValueError, match=r"cannot run under FSDPStrategy.*tclora merge --adapters"):
        check_strategy(FSDPStrategy())
    with pytest.raises(ValueError, match=r"cannot run under DeepSpeedStrategy\(stage=3\)"):
        check_strategy(deepspeed_strategy(3))
    check_strategy(deepspeed_strategy(2))
    check_strategy(DDPStrategy())


def test_study_runs_on_the_strategy_device_and_the_model_goes_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lightning's teardown moves the module to the CPU before on_fit_end: on_device moves it to
    the strategy's root device for the study, and back afterwards, also when the study fails."""
    from tclora.callbacks.cp_merge import on_device

    module = torch.nn.Linear(2, 2)
    moves: list[str] = []
    monkeypatch.setattr(module, "to", lambda device: moves.append(str(device)) or module)
    with on_device(module, torch.device("cpu")):
        pass
    assert moves == []  # already there
    with pytest.raises(RuntimeError, match="study failed"), on_device(module, torch.device("meta")):
        assert moves == ["meta"]
        raise RuntimeError("study failed")
    assert moves == ["meta", "cpu"]


def test_an_error_in_the_validation_loaders_is_not_swallowed(tmp_path: Path) -> None:
    """Before: any exception of ``val_dataloader()`` meant "no validation data", and the study
    then kept the first merge. Only a data module without ``val_dataloader`` means that now."""
    from types import SimpleNamespace

    class Broken(LightningDataModule):
        def val_dataloader(self) -> Any:
            raise RuntimeError("the validation files are unreadable")

    callback = _callback(tmp_path, [])
    with pytest.raises(RuntimeError, match="the validation files are unreadable"):
        callback._val_loaders(SimpleNamespace(datamodule=Broken(), val_dataloaders=None))
    missing = SimpleNamespace(datamodule=LightningDataModule(), val_dataloaders=None)
    assert callback._val_loaders(missing) == []


def test_the_state_records_how_the_merges_were_built() -> None:
    state = CPMergeCallback(density=0.5, merge_space="full", seed=3).state_dict()
    assert state["merge_options"] == {
        "engine": "factored",
        "merge_space": "full",
        "cp_iters": 100,
        "cp_tol": 1e-8,
        "density": 0.5,
        "cart_rank": 0.1,
        "seed": 3,
    }
