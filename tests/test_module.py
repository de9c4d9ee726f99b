"""LoRAModule: the per-adapter invariant, export round trip, resume, checkpoint size, errors."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import (
    build_tiny_llama,
    deepspeed_strategy,
    free_port,
    make_batch,
    randomize_lora,
)
from lightning.pytorch import (
    Callback,
    LightningDataModule,
    LightningModule,
    Trainer,
    seed_everything,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from tclora.assets import ModelNotFoundError
from tclora.module import LoRAModule, linear_module_names, lr_at_step

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


# ----------------------------------------------------------------------------- helpers
class ListDataModule(LightningDataModule):
    """Yields a fixed list of batches in order; validation is one loader per cluster."""

    def __init__(
        self,
        batches: list[dict[str, torch.Tensor]],
        num_clusters: int,
        val_batches: list[list[dict[str, torch.Tensor]]] | None = None,
    ) -> None:
        super().__init__()
        self.batches = batches
        self.num_clusters = num_clusters
        self.val_batches = val_batches

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]

    def val_dataloader(self) -> list[DataLoader]:
        if self.val_batches is None:
            return []
        return [DataLoader(v, batch_size=None) for v in self.val_batches]  # type: ignore[arg-type]


def make_trainer(tmp_path: Path | None = None, **kwargs: Any) -> Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path) if tmp_path else None,
    )
    defaults.update(kwargs)
    return Trainer(**defaults)


def fit(
    model_dir: Path,
    batches: list[dict[str, torch.Tensor]],
    num_clusters: int,
    trainer_kwargs: dict[str, Any] | None = None,
    **module_kwargs: Any,
) -> tuple[LoRAModule, Trainer]:
    seed_everything(0)
    kwargs: dict[str, Any] = dict(model=str(model_dir), r=4, lora_alpha=8, lr=1e-2)
    kwargs.update(module_kwargs)
    module = LoRAModule(**kwargs)
    trainer = make_trainer(**(trainer_kwargs or {}))
    trainer.fit(module, datamodule=ListDataModule(batches, num_clusters))
    return module, trainer


def adapter_weights(module: LoRAModule, index: int) -> dict[str, torch.Tensor]:
    """Adapter ``index``'s weights, renamed as if it were adapter 0."""
    name = module.adapter_names[index]
    return {
        n.replace(f".{name}.", ".cluster_0."): p.detach().clone()
        for n, p in module.adapter_parameters(index)
    }


# ----------------------------------------------------------------------------- pure math
def test_lr_schedules() -> None:
    assert lr_at_step(0, base_lr=1.0) == 1.0
    assert lr_at_step(0, base_lr=1.0, warmup_steps=4) == pytest.approx(0.25)
    assert lr_at_step(3, base_lr=1.0, warmup_steps=4) == pytest.approx(1.0)
    lin = [lr_at_step(s, base_lr=1.0, schedule="linear", total_steps=4) for s in range(5)]
    assert lin == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    cos = lr_at_step(2, base_lr=2.0, schedule="cosine", warmup_steps=1, total_steps=5)
    assert cos == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    with pytest.raises(ValueError, match="total_steps=None must be a positive int"):
        lr_at_step(0, base_lr=1.0, schedule="cosine")
    with pytest.raises(ValueError, match="schedule='step' is not one of"):
        lr_at_step(0, base_lr=1.0, schedule="step")


def test_linear_module_names(tiny_llama: Any) -> None:
    assert linear_module_names(tiny_llama) == LLAMA_LINEARS


# ----------------------------------------------------------------------------- model building
def test_configure_model_builds_k_seeded_adapters(tiny_model_dir: Path) -> None:
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=3, r=4, init_seed=5)
    module.configure_model()
    module.configure_model()  # idempotent
    assert module.adapter_names == ["cluster_0", "cluster_1", "cluster_2"]
    targets = set(module.model.peft_config["cluster_0"].target_modules)
    assert targets == set(LLAMA_LINEARS)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 3 * 2 * 2 * len(LLAMA_LINEARS)  # K x layers x (A, B) x modules
    # adapter k of a K-adapter model == adapter 0 of a one-adapter model seeded init_seed + k
    single = LoRAModule(model=str(tiny_model_dir), num_adapters=1, r=4, init_seed=6)
    single.configure_model()
    torch.testing.assert_close(adapter_weights(module, 1), adapter_weights(single, 0))
    a0, a1 = adapter_weights(module, 0), adapter_weights(module, 1)
    assert any(not torch.equal(a0[k], a1[k]) for k in a0)
    # shared_init: every adapter starts as adapter 0 of a one-adapter model seeded init_seed
    shared = LoRAModule(
        model=str(tiny_model_dir), num_adapters=3, r=4, init_seed=5, shared_init=True
    )
    shared.configure_model()
    first = LoRAModule(model=str(tiny_model_dir), num_adapters=1, r=4, init_seed=5)
    first.configure_model()
    for k in range(3):
        torch.testing.assert_close(adapter_weights(shared, k), adapter_weights(first, 0))


def test_configure_model_under_meta_device_loads_real_weights(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    with torch.device("meta"):  # what Trainer.init_module(empty_init=True) does under FSDP
        module.configure_model()
    assert all(p.device.type == "cpu" for p in module.parameters())
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ref = dict(reference.named_parameters())
    for name, param in module.model.named_parameters():
        if "lora_" not in name:
            key = name.removeprefix("base_model.model.").replace(".base_layer", "")
            torch.testing.assert_close(param, ref[key], rtol=0, atol=0)


def test_bfloat16_and_gradient_checkpointing(tiny_model_dir: Path) -> None:
    batches = [make_batch(0, 1), make_batch(1, 2)]
    module, _ = fit(
        tiny_model_dir, batches, 2, dtype="bfloat16", gradient_checkpointing=True, num_adapters=2
    )
    base = module.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.is_activation_checkpointing
    for i in range(2):
        weights = adapter_weights(module, i)
        assert all(w.dtype == torch.float32 for w in weights.values())
        assert any("lora_B" in n and w.abs().sum() > 0 for n, w in weights.items())


# ----------------------------------------------------------------------------- the invariant
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_k_adapter_fit_equals_single_adapter_fits(tiny_model_dir: Path, dropout: float) -> None:
    order = [0, 1, 1, 0, 2, 0, 1, 2]
    batches = [make_batch(c, seed=i) for i, c in enumerate(order)]
    common = dict(
        lora_dropout=dropout,
        weight_decay=0.1,
        warmup_steps=1,
        lr_schedule="linear",
        max_steps_per_adapter=4,
    )
    joint, _ = fit(tiny_model_dir, batches, 3, **common)  # K from the data module
    assert joint.adapter_names == ["cluster_0", "cluster_1", "cluster_2"]
    for k in range(3):
        own = [{**b, "cluster_id": torch.zeros_like(b["cluster_id"])} for b in batches]
        own = [b for b, c in zip(own, order, strict=True) if c == k]
        alone, _ = fit(tiny_model_dir, own, 1, init_seed=k, **common)
        got, want = adapter_weights(joint, k), adapter_weights(alone, 0)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert any("lora_B" in n and w.abs().sum() > 0 for n, w in got.items())  # it trained
        assert joint._adapter_steps[k] == order.count(k)


class _Snapshots(Callback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.states: list[dict[str, dict[str, torch.Tensor]]] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, *args: Any) -> None:
        module: LoRAModule = pl_module
        optimizer = trainer.optimizers[0]
        names = dict(module.adapter_parameters(1))
        self.weights.append({n: p.detach().clone() for n, p in names.items()})
        self.states.append(
            {
                n: {k: v.clone() for k, v in optimizer.state[p].items()}
                for n, p in names.items()
                if p in optimizer.state
            }
        )


def test_adamw_never_touches_inactive_adapter(tiny_model_dir: Path) -> None:
    """Weight decay > 0 and momentum from a step of adapter 1: adapter 0's steps leave it alone."""
    batches = [make_batch(1, 0), make_batch(0, 1), make_batch(0, 2), make_batch(0, 3)]
    snaps = _Snapshots()
    module, trainer = fit(
        tiny_model_dir,
        batches,
        2,
        trainer_kwargs=dict(callbacks=[snaps]),
        weight_decay=0.5,
        lr=0.1,
    )
    assert snaps.states[0], "adapter 1 has optimizer state after its own step"
    for later_w, later_s in zip(snaps.weights[1:], snaps.states[1:], strict=True):
        for n, w in later_w.items():
            assert torch.equal(w, snaps.weights[0][n])  # bitwise
        assert later_s.keys() == snaps.states[0].keys()
        for n, state in later_s.items():
            for key, value in state.items():
                assert torch.equal(value, snaps.states[0][n][key])
    groups = trainer.optimizers[0].param_groups
    assert [g["adapter"] for g in groups] == ["cluster_0", "cluster_1"]
    assert module._adapter_steps == [3, 1]


# ----------------------------------------------------------------------------- validation/logging
def test_logs_losses_lr_and_throughput(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    batches = [make_batch(0, 0), make_batch(1, 1)]
    val = [[make_batch(0, 10)], [make_batch(1, 11), make_batch(1, 12)]]
    seed_everything(0)
    module = LoRAModule(model=str(tiny_model_dir), r=4, lr=1e-2, warmup_steps=2)
    trainer = make_trainer(
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        limit_val_batches=None,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=ListDataModule(batches, 2, val))
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/loss_cluster_0", "train/loss_cluster_1", "train/tokens_per_s"]:
        assert key in metrics, key
    assert float(metrics["lr/cluster_1"]) == pytest.approx(0.005)  # warmup step 1 of 2
    # validation: per-cluster token-weighted means, recomputed by hand
    module.eval()
    expected = []
    with torch.no_grad():
        for k, loaders in enumerate(val):
            module.activate(k)
            losses = [module._forward_loss(b) for b in loaders]
            expected.append(torch.stack(losses).mean())
    torch.testing.assert_close(metrics["val/loss_cluster_0"], expected[0])
    torch.testing.assert_close(metrics["val/loss_cluster_1"], expected[1])
    overall = (expected[0] + 2 * expected[1]) / 3  # same token count per batch
    torch.testing.assert_close(metrics["val/loss"], overall)
    assert list(Path(trainer.logger.log_dir).glob("events.out.tfevents.*"))  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- export
def test_export_round_trip_identical_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    batches = [make_batch(0, 0), make_batch(1, 1), make_batch(1, 2)]
    export = tmp_path / "adapters"
    module, _ = fit(tiny_model_dir, batches, 2, export_dir=str(export), use_rslora=True)
    folders = sorted(p.name for p in export.iterdir())
    # peft's save_pretrained: one folder per adapter and a model card; no temporary leftovers
    assert folders == ["README.md", "cluster_0", "cluster_1", "tclora_adapters.json"]
    for name in ("cluster_0", "cluster_1"):  # every adapter names its base (not only the first)
        config = json.loads((export / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(tiny_model_dir)
        assert config["inference_mode"] is True
    probe = make_batch(0, 99)
    module.eval()
    for k, name in enumerate(module.adapter_names):
        folder = export / name
        # the same keys and tensors as peft's own save_pretrained selects
        saved = load_file(folder / "adapter_model.safetensors")
        peft_saved = get_peft_model_state_dict(module.model, adapter_name=name)
        assert sorted(saved) == sorted(peft_saved)
        for key, value in peft_saved.items():
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        loaded = PeftModel.from_pretrained(base, folder).eval()
        module.activate(k)
        with torch.no_grad():
            want = module.model(input_ids=probe["input_ids"]).logits
            got = loaded(input_ids=probe["input_ids"]).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        with loaded.disable_adapter(), torch.no_grad():
            plain = loaded(input_ids=probe["input_ids"]).logits
        assert not torch.allclose(plain, want)  # the adapter changes the output
    # exporting again replaces the folders atomically, and removes a killed export's leftovers
    orphan = tmp_path / ".adapters.tmp-999999-0123abcd"
    (orphan / "cluster_0").mkdir(parents=True)
    again = module.export_adapters(export)
    assert again == [export / "cluster_0", export / "cluster_1"]
    assert sorted(p.name for p in export.iterdir()) == folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


def test_export_set_is_replaced_whole_or_not_at_all(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: a kill during export left cluster_0 complete and cluster_1 missing."""
    import tclora.merge.export

    batches = [make_batch(0, 0), make_batch(1, 1)]
    export = tmp_path / "adapters"
    module, _ = fit(tiny_model_dir, batches, 2, export_dir=str(export))
    before = {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    real_write = tclora.merge.export.write_peft_folder
    written: list[Path] = []

    def dies_after_the_first_adapter(folder: Path, *args: Any) -> None:
        real_write(folder, *args)
        written.append(folder)
        raise KeyboardInterrupt("killed mid-export")

    monkeypatch.setattr(tclora.merge.export, "write_peft_folder", dies_after_the_first_adapter)
    with torch.no_grad():
        for _, p in module.adapter_parameters(0):
            p.add_(1.0)
    with pytest.raises(KeyboardInterrupt, match="killed mid-export"):
        module.export_adapters(export)
    assert len(written) == 1 and not written[0].exists()  # the half-written set is gone
    after = {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    assert after == before  # the previous set is untouched, both adapters present
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapters"]


@pytest.mark.parametrize("study_fails", [True, False])
def test_the_adapters_are_exported_once_and_before_the_merge_study(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, study_fails: bool
) -> None:
    """Before: callbacks' ``on_fit_end`` runs before the module's, so a merge study that raised
    left ``export_dir`` unwritten after the whole fit. Now the callback has the module export
    first, and the module's own ``on_fit_end`` does not export the same step again."""
    from tclora.callbacks import CPMergeCallback
    from tclora.study import MergeStudy

    exports: list[str] = []
    real_export = LoRAModule.export_adapters

    def counted(self: LoRAModule, out_dir: Any, note: Any = None) -> list[Path]:
        exports.append("export")
        return real_export(self, out_dir, note)

    real_run = MergeStudy.run

    def run(self: MergeStudy, *args: Any, **kwargs: Any) -> Any:
        exports.append("study")
        if study_fails:
            raise RuntimeError("the study failed")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(LoRAModule, "export_adapters", counted)
    monkeypatch.setattr(MergeStudy, "run", run)
    export = tmp_path / "adapters"
    merge = CPMergeCallback(
        cp_ranks=[2],
        rules=["mean_loading"],
        baselines=["uniform"],
        scales=[1.0],
        keep="uniform",
        references=[],
        output_dir=str(tmp_path / "merge"),
        tokenizer=str(tiny_model_dir),
        progress=False,
    )
    seed_everything(0)
    module = LoRAModule(model=str(tiny_model_dir), r=4, lr=1e-2, export_dir=str(export))
    trainer = make_trainer(callbacks=[merge])
    data = ListDataModule([make_batch(0, 0), make_batch(1, 1)], 2)
    if study_fails:
        with pytest.raises(RuntimeError, match="the study failed"):
            trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, datamodule=data)
    assert exports == ["export", "study"]
    manifest = json.loads((export / "tclora_adapters.json").read_text())
    assert manifest["adapter_steps"] == [1, 1]
    assert (export / "cluster_0" / "adapter_model.safetensors").is_file()
    assert (export / "cluster_1" / "adapter_model.safetensors").is_file()


def test_export_dir_is_checked_before_any_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Before: an unwritable export dir failed only after the whole fit and merge study."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(
        PermissionError,
        match=r"model.export_dir='.*a_file/adapters' cannot be a folder: '.*a_file' is a file",
    ):
        LoRAModule(model=str(tiny_model_dir), export_dir=str(blocker / "adapters"))
    foreign = tmp_path / "runs"
    (foreign / "tensorboard").mkdir(parents=True)
    with pytest.raises(
        ValueError,
        match=r"model.export_dir='.*runs' holds other files \(\['tensorboard'\]\) and is not an "
        r"earlier adapter export \(no tclora_adapters.json\)",
    ):
        LoRAModule(model=str(tiny_model_dir), export_dir=str(foreign))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "runs"]  # nothing created


def test_logged_losses_are_not_aliased_with_the_schedule(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Before: with round robin over K=2 and log_every_n_steps=2, every logged train/loss came
    from cluster 1 and cluster 0's curve was never written."""
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    class StepLosses(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_train_batch_end(
            self, trainer: Trainer, pl_module: Any, outputs: Any, *a: Any
        ) -> None:
            self.losses.append(float(outputs["loss"]))

    batches = [make_batch(i % 2, i) for i in range(8)]
    steps = StepLosses()
    seed_everything(0)
    module = LoRAModule(model=str(tiny_model_dir), r=4, lora_alpha=8, lr=1e-2)
    trainer = make_trainer(
        logger=CSVLogger(str(tmp_path), name="csv"), log_every_n_steps=2, callbacks=[steps]
    )
    trainer.fit(module, datamodule=ListDataModule(batches, 2))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as handle:  # type: ignore[union-attr]
        rows = list(csv.DictReader(handle))

    def logged(key: str) -> dict[int, float]:
        return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}

    own_0, own_1 = logged("train/loss_cluster_0"), logged("train/loss_cluster_1")
    assert sorted(own_0) == [0, 2, 4, 6] and sorted(own_1) == [1, 3, 5, 7]
    for step, value in {**own_0, **own_1}.items():
        assert value == pytest.approx(steps.losses[step], abs=1e-6)
    assert sorted(logged("lr/cluster_0")) == [0, 2, 4, 6]
    window = logged("train/loss")
    assert sorted(window) == [1, 3, 5, 7]
    for step, value in window.items():  # the mean of one step of each cluster
        assert value == pytest.approx((steps.losses[step] + steps.losses[step - 1]) / 2, abs=1e-6)


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_holds_only_adapters(tiny_model_dir: Path, tmp_path: Path) -> None:
    batches = [make_batch(0, 0), make_batch(1, 1)]
    module, trainer = fit(tiny_model_dir, batches, 2, weight_decay=0.1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    keys = list(ckpt["state_dict"])
    lora_keys = {n for n, _ in module.named_parameters() if "lora_" in n}
    assert set(keys) == lora_keys
    assert len(ckpt["optimizer_states"][0]["param_groups"]) == 2
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in module.named_parameters() if "lora_" not in n
    )
    assert path.stat().st_size < 0.1 * base_bytes, (path.stat().st_size, base_bytes)
    assert ckpt["tclora"]["adapter_steps"] == [1, 1]
    # load_from_checkpoint rebuilds the base from the hub/folder and restores the adapters
    restored = LoRAModule.load_from_checkpoint(path)
    torch.testing.assert_close(adapter_weights(restored, 1), adapter_weights(module, 1))


def test_resume_equals_uninterrupted_fit(tiny_model_dir: Path, tmp_path: Path) -> None:
    order = [0, 1, 0, 1, 1]
    batches = [make_batch(c, seed=i) for i, c in enumerate(order)]
    common: dict[str, Any] = dict(
        lora_dropout=0.1,
        weight_decay=0.1,
        warmup_steps=2,
        lr_schedule="cosine",
        max_steps_per_adapter=8,
    )
    full, _ = fit(tiny_model_dir, batches, 2, trainer_kwargs=dict(max_epochs=3), **common)
    first, trainer = fit(tiny_model_dir, batches, 2, trainer_kwargs=dict(max_epochs=1), **common)
    path = tmp_path / "epoch1.ckpt"
    trainer.save_checkpoint(path)
    seed_everything(123)  # resuming must not depend on the global seed
    resumed = LoRAModule(model=str(tiny_model_dir), r=4, lora_alpha=8, lr=1e-2, **common)
    make_trainer(max_epochs=3).fit(resumed, datamodule=ListDataModule(batches, 2), ckpt_path=path)
    for k in range(2):
        torch.testing.assert_close(
            adapter_weights(resumed, k), adapter_weights(full, k), rtol=0, atol=0
        )
        assert not torch.allclose(
            torch.cat([w.flatten() for w in adapter_weights(first, k).values()]),
            torch.cat([w.flatten() for w in adapter_weights(full, k).values()]),
        )
    assert resumed._adapter_steps == full._adapter_steps == [6, 9]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(r=0), r"r=0 is invalid; expected an int > 0"),
        (dict(r=-2), r"r=-2 is invalid"),
        (dict(num_adapters=0), r"num_adapters=0 is invalid; expected an int >= 1"),
        (dict(lora_alpha=0), r"lora_alpha=0 is invalid"),
        (dict(lora_dropout=1.0), r"lora_dropout=1.0 is invalid; expected a float in \[0, 1\)"),
        (dict(target_modules=[]), r"target_modules=\[\] is invalid"),
        (dict(lr=0.0), r"lr=0.0 is invalid"),
        (dict(weight_decay=-1.0), r"weight_decay=-1.0 is invalid"),
        (dict(warmup_steps=-1), r"warmup_steps=-1 is invalid"),
        (dict(lr_schedule="step"), r"lr_schedule='step' is invalid"),
        (dict(max_steps_per_adapter=0), r"max_steps_per_adapter=0 is invalid"),
        (dict(dtype="float16"), r"dtype='float16' is invalid; expected \['float32', 'bfloat16'\]"),
        (dict(adapter_prefix=""), r"adapter_prefix='' is invalid"),
    ],
)
def test_bad_arguments(tiny_model_dir: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LoRAModule(model=str(tiny_model_dir), **kwargs)


def test_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such local folder"):
        LoRAModule(model=str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="hub is unreachable"):
        LoRAModule(model="no-such-org/no-such-model")


def test_unknown_target_module_lists_available(tiny_model_dir: Path) -> None:
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=1, target_modules=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"does not have: \['qkv'\]\. Its linear modules are: "):
        module.configure_model()


def test_adapter_count_must_match_cluster_count(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="num_adapters=3 but the data module has num_clusters=2"):
        fit(tiny_model_dir, [make_batch(0, 0)], 2, num_adapters=3)
    module = LoRAModule(model=str(tiny_model_dir))
    with pytest.raises(ValueError, match="num_adapters=None and no data module"):
        module.configure_model()


def test_batch_errors(tiny_model_dir: Path) -> None:
    mixed = make_batch(0, 0)
    mixed["cluster_id"] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"cluster_id=\[0, 1\] mixes clusters"):
        fit(tiny_model_dir, [mixed], 2)
    with pytest.raises(ValueError, match=r"cluster_id=2 is outside the 2 adapters"):
        fit(tiny_model_dir, [make_batch(2, 0)], 2)


class _PoisonAdapter(Callback):
    def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
        for name, param in pl_module.adapter_parameters(1):
            if "lora_B" in name:
                param.data.fill_(float("nan"))


def test_non_finite_loss_names_cluster_and_step(tiny_model_dir: Path) -> None:
    batches = [make_batch(0, 0), make_batch(1, 1)]
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss nan at global step 1 .*cluster_1"
    ):
        fit(tiny_model_dir, batches, 2, trainer_kwargs=dict(callbacks=[_PoisonAdapter()]))


def test_ddp_without_find_unused_is_rejected(tiny_model_dir: Path) -> None:
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2)
    module.trainer = make_trainer(devices=2, strategy="ddp")
    with pytest.raises(ValueError, match="use strategy='ddp_find_unused_parameters_true'"):
        module.setup("fit")
    module.trainer = make_trainer(devices=2, strategy="ddp_find_unused_parameters_true")
    module.setup("fit")  # accepted


def test_deepspeed_setup_checks(tiny_model_dir: Path) -> None:
    """ZeRO-3 with an export is refused before training (the export would read empty shards);
    DeepSpeed over several processes is not held to DDP's find_unused_parameters (it is a
    DDPStrategy subclass without DDP's kwargs, and was refused as if it were DDP)."""
    from types import SimpleNamespace

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, export_dir="out")
    module.trainer = SimpleNamespace(strategy=deepspeed_strategy(3))  # type: ignore[assignment]
    with pytest.raises(
        ValueError, match=r"export_dir='out' under DeepSpeedStrategy\(stage=3\).*use stage 2"
    ):
        module.setup("fit")
    module.trainer = SimpleNamespace(strategy=deepspeed_strategy(2, world_size=4))  # type: ignore[assignment]
    module.setup("fit")  # accepted
    unexported = LoRAModule(model=str(tiny_model_dir), num_adapters=2)
    unexported.trainer = SimpleNamespace(strategy=deepspeed_strategy(3))  # type: ignore[assignment]
    unexported.setup("fit")  # nothing to export: accepted


def test_deepspeed_micro_batch_comes_from_the_data_module(tiny_model_dir: Path) -> None:
    """Lightning's DeepSpeedStrategy reads ``train_micro_batch_size_per_gpu`` from the train
    loader's ``batch_sampler``, which a loader of whole batches (ClusterDataModule's) lacks: the
    H100 fit died there. ``setup`` now gives the config the data module's batch size, and keeps
    a value the user's config sets."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    whole_batches = DataLoader([{"input_ids": torch.zeros(6, 4)}], batch_size=None)
    source = SimpleNamespace(is_defined=lambda: True, dataloader=lambda: whole_batches)
    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2)
    strategy = deepspeed_strategy(2)
    module.trainer = SimpleNamespace(  # type: ignore[assignment]
        strategy=strategy,
        datamodule=SimpleNamespace(batch_size=6),
        accumulate_grad_batches=1,
        gradient_clip_val=None,
        fit_loop=SimpleNamespace(_data_source=source),
    )
    strategy._lightning_module = module
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'batch_size'"):
        strategy._format_batch_size_and_grad_accum_config()  # Lightning's own, before setup
    module.setup("fit")
    strategy.config.pop("gradient_accumulation_steps")  # the failed call's first write
    strategy._format_batch_size_and_grad_accum_config()
    assert strategy.config["train_micro_batch_size_per_gpu"] == 6
    strategy.config = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 3}
    module.setup("fit")
    assert strategy.config["train_micro_batch_size_per_gpu"] == 3


def test_deepspeed_steps_the_inactive_adapters_with_learning_rate_zero(
    tiny_model_dir: Path,
) -> None:
    """DeepSpeed's flat partitions give the inactive adapters zero gradients, not ``None``, so
    AdamW would move them with momentum and weight decay (seen with DeepSpeed 0.19.8, ZeRO-2, on
    the CPU); their groups step with learning rate 0 there. Elsewhere their ``None`` gradients
    make AdamW skip them, and the learning rates are left as the schedules set them."""
    from types import SimpleNamespace

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=3, lr=0.01)
    module.configure_model()
    for strategy, want in ((deepspeed_strategy(2), [0.01, 0.0, 0.0]), (None, [0.01] * 3)):
        optimizer = module.configure_optimizers()
        module.trainer = SimpleNamespace(strategy=strategy)  # type: ignore[assignment]
        module._pending = {0}
        module.on_before_optimizer_step(optimizer)
        assert [g["lr"] for g in optimizer.param_groups] == want
        assert module._pending == set()


def test_deepspeed_puts_the_inactive_adapters_optimizer_state_back(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed's flat partitions give the inactive adapters zero gradients: stepped with
    learning rate 0 they keep their weights, but AdamW still advances their moments and step
    counts. ``LoRAModule`` holds their optimizer state before the step and puts it back right
    after it, so the adapters end where a fit in which AdamW skipped them (``None`` gradients)
    ends. Here a torch AdamW that zero-fills missing gradients, as DeepSpeed's partitions do,
    stands in for DeepSpeed (``benchmarks/gpu_kit/deepspeed_fit_check.py`` runs the real one:
    the same adapters, bit for bit, at ZeRO-1 and 2)."""
    from types import SimpleNamespace

    import tclora.module

    class ZeroFilled(torch.optim.AdamW):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            loss = closure() if closure is not None else None
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            super().step()
            return loss

    def train(strategy: Any) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, lr=0.01, weight_decay=0.1)
        module.configure_model()
        optimizer = module.configure_optimizers()
        if strategy is not None:
            optimizer.__class__ = ZeroFilled
        module.trainer = SimpleNamespace(strategy=strategy)  # type: ignore[assignment]
        for step, index in enumerate([0, 1, 0, 0, 1]):
            module.activate(index)
            optimizer.param_groups[index]["lr"] = 0.01
            module._pending = {index}

            def closure(step: int = step, index: int = index) -> torch.Tensor:
                loss = module._forward_loss(make_batch(index, seed=step))
                loss.backward()
                module.on_before_optimizer_step(optimizer)  # what Lightning calls here
                return loss

            module.optimizer_step(0, step, optimizer, closure)
            optimizer.zero_grad(set_to_none=True)
        assert module._held is None
        return {
            f"{i}.{k}": v.clone() for i in range(2) for k, v in adapter_weights(module, i).items()
        }

    skipped = train(None)  # torch's AdamW skips the None gradients
    torch.testing.assert_close(train(deepspeed_strategy(2)), skipped, rtol=0, atol=0)
    monkeypatch.setattr(tclora.module, "_put_back", lambda *args: None)
    moved = train(deepspeed_strategy(2))  # learning rate 0 alone: the moments decayed
    assert any(not torch.equal(moved[k], skipped[k]) for k in skipped)


def test_fsdp_without_adapter_units_is_warned_about(tiny_model_dir: Path) -> None:
    """FSDP whose units mix frozen and trainable weights still trains, at the cost of a gradient
    of whole units on every rank: ``setup`` says so and names the policy that avoids it."""
    import warnings
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2)
    for policy, name in (({LlamaDecoderLayer}, "ModuleWrapPolicy"), (None, "NoneType")):
        module.trainer = SimpleNamespace(  # type: ignore[assignment]
            strategy=FSDPStrategy(auto_wrap_policy=policy), precision="bf16-mixed"
        )
        with pytest.warns(
            UserWarning,
            match=rf"FSDPStrategy\(auto_wrap_policy={name}\): FSDP units that hold frozen and "
            r"LoRA weights together .* 3.5 GB per rank against 1.7 MB.* "
            r"tclora.fsdp_policy.AdapterWrapPolicy\(\[<decoder layer class>\]\)",
        ):
            module.setup("fit")
    policy = AdapterWrapPolicy([LlamaDecoderLayer])
    strategy = FSDPStrategy(auto_wrap_policy=policy)
    strategy.cluster_environment = SimpleNamespace(world_size=lambda: 2)  # type: ignore[assignment]
    module.trainer = SimpleNamespace(strategy=strategy)  # type: ignore[assignment]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.setup("fit")
    assert strategy.kwargs["auto_wrap_policy"] is policy


def test_unsharded_fsdp_without_mixed_precision_refuses_tied_embeddings(
    tiny_model_dir: Path, tmp_path: Path, tokenizer: Any
) -> None:
    """One process (torch turns FULL_SHARD into NO_SHARD) or NO_SHARD, no mixed precision, and
    tied embeddings: torch's FSDP asserts at the first step (an H100 and the CPU); setup refuses
    it before the model is loaded. Mixed precision, sharding or untied embeddings pass."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy

    def setup(model: Path, world: int, sharding: str, precision: str) -> None:
        module = LoRAModule(model=str(model), num_adapters=2)
        strategy = FSDPStrategy(
            auto_wrap_policy=AdapterWrapPolicy([LlamaDecoderLayer]), sharding_strategy=sharding
        )
        strategy.cluster_environment = SimpleNamespace(world_size=lambda: world)  # type: ignore[assignment]
        module.trainer = SimpleNamespace(strategy=strategy, precision=precision)  # type: ignore[assignment]
        module.setup("fit")
        assert module.model is None  # nothing loaded

    for world, sharding, precision in ((1, "FULL_SHARD", "32-true"), (2, "NO_SHARD", "bf16-true")):
        with pytest.raises(
            ValueError,
            match=rf"FSDPStrategy with {world} process\(es\) and sharding_strategy={sharding} "
            rf"shards nothing \(NO_SHARD\), and with precision='{precision}' torch's FSDP fails "
            r"at the first step on the tied input and output embeddings of model='.*tiny-llama.*' "
            r".*use precision 'bf16-mixed' or '16-mixed', 2 or more processes with FULL_SHARD, or "
            r"one device without FSDP \(strategy 'auto'\)",
        ):
            setup(tiny_model_dir, world, sharding, precision)
    setup(tiny_model_dir, 1, "FULL_SHARD", "bf16-mixed")
    setup(tiny_model_dir, 2, "FULL_SHARD", "32-true")
    untied = tmp_path / "untied"
    build_tiny_llama(len(tokenizer), tie_word_embeddings=False).save_pretrained(untied)
    tokenizer.save_pretrained(untied)
    setup(untied, 1, "FULL_SHARD", "32-true")


@pytest.mark.parametrize("switch_in_step_only", [False, True])
def test_lightning_fsdp_with_adapter_units_trains_every_adapter(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, switch_in_step_only: bool
) -> None:
    """Lightning's FSDPStrategy with AdapterWrapPolicy (one process: NO_SHARD) trains both
    adapters. FSDP sets each unit's requires_grad from its original parameters in the root
    pre-forward, which Lightning runs before training_step; the adapter is switched before it, in
    on_train_batch_start. Switched in training_step only (the code until 2026-11-27), the
    second adapter's units got no gradient: the H100's "element 0 of tensors does not require
    grad"."""
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy

    class CPUFSDPStrategy(FSDPStrategy):
        """Lightning refuses FSDPStrategy itself off a GPU; torch's FSDP runs over gloo."""

    fsdp_init = FullyShardedDataParallel.__init__

    def on_cpu(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["device_id"] = kwargs.get("device_id") or torch.device("cpu")
        fsdp_init(self, *args, **kwargs)

    monkeypatch.setattr(FullyShardedDataParallel, "__init__", on_cpu)
    # untied embeddings: tied ones under NO_SHARD hit an FSDP assertion of their own in float32
    # under either policy (benchmarks/gpu_kit/fsdp_noshard_check.py)
    model_dir = tmp_path / "untied"
    build_tiny_llama(len(tokenizer), tie_word_embeddings=False).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    if switch_in_step_only:
        monkeypatch.setattr(
            LoRAModule, "on_train_batch_start", LightningModule.on_train_batch_start
        )
    seed_everything(0)
    module = LoRAModule(model=str(model_dir), r=4, lr=1e-2, gradient_checkpointing=False)
    batches = [make_batch(c, seed) for seed, c in enumerate((0, 1, 0, 1))]
    strategy = CPUFSDPStrategy(
        auto_wrap_policy=AdapterWrapPolicy([LlamaDecoderLayer]), use_orig_params=True
    )
    trainer = make_trainer(strategy=strategy, max_steps=4)
    # Lightning's process group set-up writes MASTER_ADDR/PORT, NODE_RANK, LOCAL_RANK and
    # OMP_NUM_THREADS into os.environ; left there, a later Lightning subprocess would take
    # LOCAL_RANK for a launcher's and never start its other ranks
    environ = dict(os.environ)
    try:
        if switch_in_step_only:
            with pytest.raises(RuntimeError, match="element 0 of tensors does not require grad"):
                trainer.fit(module, datamodule=ListDataModule(batches, 2))
            return
        trainer.fit(module, datamodule=ListDataModule(batches, 2))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    units = FullyShardedDataParallel.fsdp_modules(trainer.strategy.model)
    assert len(units) == 3 + 14 * 2 * 2  # root, 2 layers, lora_A and lora_B of 14 layers x 2
    for index in range(2):
        moved = [p.detach().abs().max() for _, p in module.adapter_parameters(index)]
        assert all(m > 0 for m in moved)  # lora_B starts at zero: each adapter took steps
    assert module._adapter_steps == [2, 2]


def test_schedule_length_follows_each_clusters_own_batches(tiny_model_dir: Path) -> None:
    """Without max_steps_per_adapter, adapter k decays over its own cluster's steps."""

    class CountingSampler:
        def num_batches_per_cluster(self) -> list[int]:
            return [3, 1]

    class Counted(ListDataModule):
        def train_dataloader(self) -> DataLoader:
            loader = super().train_dataloader()
            loader.cluster_sampler = CountingSampler()  # type: ignore[attr-defined]
            return loader

    batches = [make_batch(0, 0), make_batch(1, 1), make_batch(0, 2), make_batch(0, 3)]
    seed_everything(0)
    module = LoRAModule(model=str(tiny_model_dir), r=4, lr=1.0, lr_schedule="linear")
    make_trainer(max_epochs=2).fit(module, datamodule=Counted(batches, 2))
    assert module._schedule_lengths == [6, 2]
    assert module.lr_for(0) == 0.0 and module.lr_for(1) == 0.0  # both schedules ran out
    assert module._adapter_steps == [6, 2]

    # limit_train_batches=2 of the 4 batches per epoch: each cluster keeps half of its steps
    # (before: [6, 2], a schedule that never got near 0); 2 steps is no longer than the warmup
    seed_everything(0)
    module = LoRAModule(
        model=str(tiny_model_dir), r=4, lr=1.0, lr_schedule="linear", warmup_steps=2
    )
    with pytest.warns(
        UserWarning,
        match=r"the schedules of \['cluster_1'\] are \[1\] steps long, no longer than "
        r"warmup_steps=2: these adapters never leave warmup nor decay",
    ):
        make_trainer(max_epochs=2, limit_train_batches=2).fit(
            module, datamodule=Counted(batches, 2)
        )
    assert module._schedule_lengths == [3, 1]


class ResumableBatches:
    """A stateful iterable of batches: Lightning saves its position and resumes mid-epoch."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.position = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Any:
        start, self._resume_at = self._resume_at, 0
        for i in range(start, len(self.batches)):
            self.position = i + 1
            yield self.batches[i]
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_at = int(state["position"])


class ResumableDataModule(ListDataModule):
    def train_dataloader(self) -> Any:
        return ResumableBatches(self.batches)


def assert_resumes_to(
    full: LoRAModule, common: dict[str, Any], batches: list[dict[str, torch.Tensor]], ckpt: Path
) -> None:
    """A new module resumed from ``ckpt`` (under another global seed) ends as ``full`` did."""
    seed_everything(7)
    resumed = LoRAModule(**common)
    make_trainer(max_epochs=2).fit(
        resumed, datamodule=ResumableDataModule(batches, 2), ckpt_path=ckpt
    )
    assert resumed._adapter_steps == full._adapter_steps == [6, 6]
    for k in range(2):
        torch.testing.assert_close(
            adapter_weights(resumed, k), adapter_weights(full, k), rtol=0, atol=0
        )


@pytest.mark.parametrize("max_steps_per_adapter", [6, None])
def test_resume_mid_epoch_equals_uninterrupted_fit(
    tiny_model_dir: Path, tmp_path: Path, max_steps_per_adapter: int | None
) -> None:
    """Bit for bit. ``None``: the schedule lengths come from the trainer's estimate of the
    steps. Before, that estimate was read in ``configure_optimizers``, which built the train
    loader before the checkpoint was restored, so Lightning dropped the loader's saved position
    (Lightning issue #20550) and the resumed fit restarted the epoch's batches from the first."""
    order = [0, 1, 1, 0, 1, 0]
    batches = [make_batch(c, seed=i) for i, c in enumerate(order)]
    common: dict[str, Any] = dict(
        model=str(tiny_model_dir),
        r=4,
        lr=1e-2,
        lora_dropout=0.1,
        weight_decay=0.1,
        warmup_steps=2,
        lr_schedule="linear",
        max_steps_per_adapter=max_steps_per_adapter,
    )
    seed_everything(0)
    full = LoRAModule(**common)
    make_trainer(max_epochs=2).fit(full, datamodule=ResumableDataModule(batches, 2))
    assert full._schedule_lengths == [6, 6]
    seed_everything(0)
    first = LoRAModule(**common)
    # a checkpoint written by ModelCheckpoint during the epoch (not after fit ended)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(max_epochs=2, max_steps=4, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(first, datamodule=ResumableDataModule(batches, 2))
    path = tmp_path / "epoch=0-step=4.ckpt"
    assert path.is_file(), sorted(tmp_path.iterdir())
    assert first._adapter_steps == [2, 2]
    assert_resumes_to(full, common, batches, path)


class _EstimateInSetup(Callback):
    """Reads the trainer's step estimate in ``setup``: the train loader is then built before
    a checkpoint is restored, and Lightning drops the loader's saved position (#20550)."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        assert trainer.estimated_stepping_batches > 0


def test_a_resume_that_lost_the_loader_position_is_refused(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    batches = [make_batch(c, seed=i) for i, c in enumerate([0, 1, 1, 0, 1, 0])]
    common: dict[str, Any] = dict(model=str(tiny_model_dir), r=4, max_steps_per_adapter=6)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    trainer = make_trainer(max_epochs=2, max_steps=4, enable_checkpointing=True, callbacks=[saver])
    trainer.fit(LoRAModule(**common), datamodule=ResumableDataModule(batches, 2))
    resumed = make_trainer(max_epochs=2, callbacks=[_EstimateInSetup()])
    with pytest.raises(RuntimeError, match=r"train loader position was not restored.*#20550"):
        resumed.fit(
            LoRAModule(**common),
            datamodule=ResumableDataModule(batches, 2),
            ckpt_path=tmp_path / "epoch=0-step=4.ckpt",
        )


class _CtrlC(Callback):
    """Presses Ctrl-C after optimizer step ``at`` (a KeyboardInterrupt inside the fit loop;
    ``at=0``: as training starts)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_start(self, trainer: Trainer, *args: Any) -> None:
        if self.at == 0:
            raise KeyboardInterrupt

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_saves_a_checkpoint_and_exports_the_adapters(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: Ctrl-C lost every step since the last checkpoint. Now the checkpoint resumes to
    the uninterrupted fit, and the adapters are exported as they were at the interrupt."""
    import signal

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    order = [0, 1, 1, 0, 1, 0]
    batches = [make_batch(c, seed=i) for i, c in enumerate(order)]
    common: dict[str, Any] = dict(model=str(tiny_model_dir), r=4, lr=1e-2, lr_schedule="linear")
    common["max_steps_per_adapter"] = 6
    seed_everything(0)
    full = LoRAModule(**common)
    make_trainer(max_epochs=2).fit(full, datamodule=ResumableDataModule(batches, 2))

    seed_everything(0)
    export = tmp_path / "adapters"
    first = LoRAModule(**common, export_dir=str(export))
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[_CtrlC(at=4)])
    try:
        with caplog.at_level("INFO"), pytest.raises(SystemExit) as exit_info:
            trainer.fit(first, datamodule=ResumableDataModule(batches, 2))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores SIGINT after
    assert exit_info.value.code == 1
    ckpt = tmp_path / "checkpoints" / "interrupted-step=4.ckpt"
    assert (
        f"LoRAModule: fit interrupted at global step 4 (adapter steps [2, 2]): checkpoint saved to "
        f"{ckpt} (resume: tclora fit --config <the same config> --ckpt_path {ckpt}); the 2 "
        f"adapters as they are exported to {export}"
    ) in caplog.text
    manifest = json.loads((export / "tclora_adapters.json").read_text())
    assert manifest["interrupted_at_step"] == 4 and manifest["adapter_steps"] == [2, 2]
    # the export holds the adapters as they were at the interrupt
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(base, export / "cluster_1", adapter_name="cluster_1")
    for name, param in first.adapter_parameters(1):
        loaded_name = name.removeprefix("model.")
        torch.testing.assert_close(dict(loaded.named_parameters())[loaded_name], param)

    assert_resumes_to(full, common, batches, ckpt)


def test_ctrl_c_before_the_first_step_saves_nothing(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import signal

    module = LoRAModule(model=str(tiny_model_dir), r=4)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[_CtrlC(at=0)])
    try:
        with caplog.at_level("INFO"), pytest.raises(SystemExit):
            trainer.fit(module, datamodule=ListDataModule([make_batch(0, 0)] * 2, 2))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert "LoRAModule: interrupted before the first step: nothing to save" in caplog.text
    assert not (tmp_path / "checkpoints").exists()


def test_export_turns_a_checkpoint_into_adapters_and_a_full_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tclora export --ckpt_path`: peft folders and a plain model that give the fit's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tclora.cli import main

    module, trainer = fit(tiny_model_dir, [make_batch(0, 0), make_batch(1, 1), make_batch(1, 2)], 2)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    full = tmp_path / "full"
    argv = ["export", "--ckpt_path", str(ckpt), "--full_model", str(full), "--fold", "cluster_1"]
    assert main(argv) == 0
    out = tmp_path / "last-adapters"
    assert capsys.readouterr().out.splitlines() == [
        f"tclora export: 2 adapters of {ckpt} (global step 3) -> {out}",
        f"tclora export: base model + cluster_1 at scale 1 -> {full} (a plain transformers model)",
    ]
    manifest = json.loads((out / "tclora_adapters.json").read_text())
    assert manifest["global_step"] == 3 and manifest["adapter_steps"] == [1, 2]

    ids = make_batch(0, 9)["input_ids"]
    module.activate(1)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        adapter = PeftModel.from_pretrained(base, out / "cluster_1").eval()
        torch.testing.assert_close(adapter(input_ids=ids).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(full).eval()
        assert not any("lora" in name for name, _ in plain.named_parameters())
        torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert (full / "tokenizer_config.json").is_file()

    merged_model = tmp_path / "merged"
    argv = ["export", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "again")]
    assert main([*argv, "--full_model", str(merged_model), "--fold", "cp2_mean_loading"]) == 0
    assert "base model + cp2_mean_loading at scale 1 ->" in capsys.readouterr().out
    folded = AutoModelForCausalLM.from_pretrained(merged_model).state_dict()
    untouched = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(folded[key], untouched[key])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fold", "cluster_0"], r"--full_model and --fold go together"),
        (
            ["--full_model", "F", "--fold", "median"],
            r"--fold='median': expected an adapter of "
            r"the checkpoint \(\['cluster_0', 'cluster_1'\]\) or a merge method: cp<R>_<rule>",
        ),
    ],
)
def test_export_errors_name_the_argument(
    tiny_model_dir: Path,
    tmp_path: Path,
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tclora.export_cli import export_main

    with pytest.raises(SystemExit):
        export_main(["--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert f"--ckpt_path='{tmp_path / 'nope.ckpt'}': no such checkpoint file" in (
        capsys.readouterr().err
    )
    _, trainer = fit(tiny_model_dir, [make_batch(0, 0), make_batch(1, 1)], 2)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    extra = [str(tmp_path / e) if e == "F" else e for e in extra]
    try:
        export_main(["--ckpt_path", str(ckpt), *extra])
    except SystemExit:
        text = capsys.readouterr().err
    except ValueError as err:
        text = str(err)
    else:
        raise AssertionError("no error")
    assert re.search(message, text), text


def test_export_folds_a_merge_built_as_the_fit_study_built_it(tiny_model_dir: Path) -> None:
    """Before: ``--fold ties`` rebuilt TIES with the default options (core space, density 0.2,
    seed 0) and scaled it by the scale the study chose for its own (full space, density 0.5)."""
    from tclora.export_cli import fold_merge
    from tclora.merge import AdapterStack
    from tclora.study import StudyConfig
    from tclora.study.run import build_merges

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=3, r=4)
    module.configure_model()
    randomize_lora(module.model)
    names = module.adapter_names
    study = StudyConfig(rules=[], baselines=["ties"], merge_space="full", density=0.5, seed=3)
    merged, how = fold_merge(
        module.model, names, "ties", None, {"ties": 2.0}, study.merge_options()
    )
    assert how == "scale 2 (chosen by the fit's study)"
    stack = AdapterStack.from_peft_model(module.model, names)
    expected = build_merges(stack, study)[0]["ties"].scaled(2.0)
    default = build_merges(stack, StudyConfig(rules=[], baselines=["ties"]))[0]["ties"].scaled(2.0)
    for name in stack.module_names[:3]:
        torch.testing.assert_close(merged.delta(name), expected.delta(name))
    assert not torch.allclose(
        merged.delta(stack.module_names[0]), default.delta(stack.module_names[0])
    )
    with pytest.warns(UserWarning, match=r"--fold='ties': the checkpoint's merge study did not "):
        fold_merge(module.model, names, "ties", None, {"ties": 2.0}, None)


class _Pickled:
    """A class ``torch.load(weights_only=True)`` does not allow."""


def test_export_refuses_a_checkpoint_that_needs_unpickling(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``tclora export`` loads with ``weights_only=True``: arbitrary objects are refused, not run."""
    from tclora.export_cli import export_main

    ckpt = tmp_path / "last.ckpt"
    torch.save({"tclora": {}, "state_dict": {}, "extra": _Pickled()}, ckpt)
    with pytest.raises(SystemExit):
        export_main(["--ckpt_path", str(ckpt)])
    assert (
        f"--ckpt_path='{ckpt}' holds objects other than tensors and plain containers, which "
        "tclora loads only with weights_only=True: Unsupported global: GLOBAL "
        f"{_Pickled.__module__}._Pickled was not an allowed global by default."
    ) in capsys.readouterr().err
    assert not (tmp_path / "last-adapters").exists()


def test_fit_with_cluster_datamodule(tiny_model_dir: Path, multitask_jsonl: Path) -> None:
    """Integration: K comes from ClusterDataModule (per-task clusters), its batches train."""
    from tclora.datamodules.cluster import ClusterDataModule

    data = ClusterDataModule(
        sources=[str(multitask_jsonl)],
        tokenizer=str(tiny_model_dir),
        clustering="per_task",
        task_field="task",
        batch_size=4,
        max_length=64,
        val_fraction=0.1,
        progress_bar=False,
    )
    seed_everything(0)
    module = LoRAModule(model=str(tiny_model_dir), r=4, lr=1e-3, lr_schedule="cosine")
    trainer = make_trainer(max_steps=8, limit_val_batches=None, val_check_interval=8)
    trainer.fit(module, datamodule=data)
    assert module.adapter_names == [f"cluster_{k}" for k in range(data.num_clusters)]
    assert data.num_clusters == 4
    assert sum(module._adapter_steps) == 8
    assert all(f"val/loss_cluster_{k}" in trainer.callback_metrics for k in range(4))
    assert len(module._schedule_lengths) == 4


def test_a_checkpoint_of_another_model_is_refused_on_load(tiny_model_dir: Path) -> None:
    """Checkpoints load non-strictly (they hold no frozen base), so adapter weights a checkpoint
    lacks would keep their initial values. The checkpoint lists its adapter weights; a model
    with other ones refuses it, also where the strategy (FSDP) consumed ``state_dict`` before
    ``on_load_checkpoint`` runs."""
    every = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    every.configure_model()
    ckpt: dict[str, Any] = {"state_dict": every.state_dict()}
    every.on_save_checkpoint(ckpt)
    assert ckpt["tclora"]["adapter_weights"] == sorted(ckpt["state_dict"])
    assert len(ckpt["tclora"]["adapter_weights"]) == 2 * 2 * 2 * len(LLAMA_LINEARS)

    q_only = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4, target_modules=["q_proj"])
    q_only.configure_model()
    fsdp_like = {k: v for k, v in ckpt.items() if k != "state_dict"}
    with pytest.raises(
        ValueError,
        match=r"checkpoint holds 56 adapter weights, this model has 8: 0 of this model's are not "
        r"in the checkpoint \(e\.g\. \[\]\), 48 of the checkpoint's are not in this model .*"
        r"another target_modules, layer count or base model",
    ):
        q_only.on_load_checkpoint(fsdp_like)
    # a checkpoint written before the list existed: its state dict still shows the gap
    every_again = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    every_again.configure_model()
    older = {"state_dict": dict(q_only.state_dict()), "tclora": dict(ckpt["tclora"])}
    del older["tclora"]["adapter_weights"]
    with pytest.raises(ValueError, match=r"checkpoint lacks 48 adapter weights, e\.g\. \['model\."):
        every_again.on_load_checkpoint(older)
    with pytest.raises(ValueError, match="checkpoint has no 'tclora' entry: it was not written by"):
        every_again.on_load_checkpoint({"state_dict": {}})
    three = LoRAModule(model=str(tiny_model_dir), num_adapters=3, r=4)
    three.configure_model()
    with pytest.raises(
        ValueError,
        match=r"checkpoint adapters \['cluster_0', 'cluster_1'\] differ from this model's "
        r"\['cluster_0', 'cluster_1', 'cluster_2'\]",
    ):
        three.on_load_checkpoint(ckpt)
    every_again.on_load_checkpoint(ckpt)  # its own kind of checkpoint loads


@pytest.mark.parametrize("policy", ["layers", "adapters"])
def test_fsdp_on_one_process_exports_whole_adapters(
    tiny_model_dir: Path, tmp_path: Path, policy: str
) -> None:
    """FSDP on a single process shards nothing (``NO_SHARD``), and torch refuses to gather such
    parameters into CPU memory: the export at fit end failed on an H100 with ``offload_to_cpu=True
    and NO_SHARD is not supported yet``. ``full_parameters`` reads them where they are; the export
    under it equals the unwrapped adapters, with the decoder layers as units and with
    ``AdapterWrapPolicy``'s units nested in them. (Lightning runs FSDP on GPUs only: torch's FSDP
    on the CPU, over gloo, stands in for it here.)"""
    import torch.distributed as dist
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from tclora.fsdp_policy import AdapterWrapPolicy
    from tclora.module import full_parameters

    module = LoRAModule(model=str(tiny_model_dir), num_adapters=2, r=4)
    module.configure_model()
    randomize_lora(module.model)  # B starts at zero: give every adapter weights of its own
    want = {  # what peft saves for each adapter of the unwrapped model
        name: {
            k: v.clone()
            for k, v in get_peft_model_state_dict(module.model, adapter_name=name).items()
        }
        for name in module.adapter_names
    }
    weight_names = module.adapter_weight_names()
    port = free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(
            module.model,
            auto_wrap_policy=(
                ModuleWrapPolicy({LlamaDecoderLayer})
                if policy == "layers"
                else AdapterWrapPolicy([LlamaDecoderLayer])
            ),
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        units = FullyShardedDataParallel.fsdp_modules(wrapped)
        assert len(units) == (3 if policy == "layers" else 3 + 28 * 2)
        assert {u.sharding_strategy for u in units} == {ShardingStrategy.NO_SHARD}
        with full_parameters(wrapped):
            folders = module.export_adapters(tmp_path / "adapters")
        # what a checkpoint under FSDP lists: the same names, no wrapper in them
        assert any("_fsdp_wrapped_module." in n for n, _ in module.named_parameters())
        assert module.adapter_weight_names() == weight_names
    finally:
        dist.destroy_process_group()
    for name, folder in zip(module.adapter_names, folders, strict=True):
        saved = load_file(folder / "adapter_model.safetensors")
        assert sorted(saved) == sorted(want[name]) and len(saved) == 28
        for key, value in saved.items():
            torch.testing.assert_close(value, want[name][key], rtol=0, atol=0)
