"""AtomicCheckpointIO: a checkpoint is replaced whole or not at all."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer

import tclora.checkpoint_io as checkpoint_io
from tclora.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_an_interrupted_save_leaves_the_previous_checkpoint_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()

    def killed_mid_write(obj: Any, handle: IO[bytes]) -> None:
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_io.torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2}, path)
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temp file left
    loaded = io.load_checkpoint(path)
    assert loaded["global_step"] == 1
    torch.testing.assert_close(loaded["w"], torch.arange(4.0), rtol=0, atol=0)


def test_a_save_removes_what_a_killed_save_left_and_keeps_a_live_writers_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "last.ckpt"
    orphan = tmp_path / f".last.ckpt.tmp-{_dead_pid()}-0123abcd"
    live = tmp_path / f".last.ckpt.tmp-{os.getpid()}-89abcdef"
    orphan.write_bytes(b"truncated")
    live.write_bytes(b"in progress")

    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)

    assert not orphan.exists() and live.exists()
    assert AtomicCheckpointIO().load_checkpoint(path)["global_step"] == 3


def test_storage_options_are_refused_as_lightning_refuses_them(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"with `storage_options` arg is not supported for "):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})
    assert not list(tmp_path.iterdir())


def test_the_default_checkpoint_io_is_replaced_and_a_chosen_one_kept() -> None:
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    assert type(trainer.strategy.checkpoint_io) is TorchCheckpointIO
    assert use_atomic_checkpoints(trainer) is True
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class Chosen(TorchCheckpointIO):
        pass

    chosen = Chosen()
    trainer = Trainer(accelerator="cpu", logger=False, plugins=[chosen])
    assert use_atomic_checkpoints(trainer) is False
    assert trainer.strategy.checkpoint_io is chosen


class _Pickled:
    """A class ``torch.load(weights_only=True)`` does not allow."""


def test_a_checkpoint_is_loaded_weights_only_even_where_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    torch.save({"global_step": 4, "extra": _Pickled()}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    assert isinstance(TorchCheckpointIO().load_checkpoint(path)["extra"], _Pickled)  # unsafe
    with pytest.raises(pickle.UnpicklingError, match=r"Unsupported global: GLOBAL .*_Pickled"):
        AtomicCheckpointIO().load_checkpoint(path)
    loaded = AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # asked for
    assert loaded["global_step"] == 4
