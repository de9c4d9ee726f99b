"""tclora._checks: device and dtype arguments of the commands, checked before any model loads."""

from __future__ import annotations

import pytest
import torch

from tclora._checks import resolve_device, resolve_dtype

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the no-GPU messages")


def test_auto_is_the_first_gpu_or_the_cpu() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == torch.device("cpu")


@no_gpu
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "gpu"])
def test_a_gpu_torch_does_not_see_is_refused(name: str) -> None:
    match = "not a device" if name == "gpu" else "torch sees no CUDA device; use 'cpu' or 'auto'"
    with pytest.raises(ValueError, match=rf"--device='{name}': {match}"):
        resolve_device(name)


def test_other_device_types_are_refused() -> None:
    with pytest.raises(ValueError, match=r"--device='meta': use 'auto', 'cpu', 'cuda'"):
        resolve_device("meta")
    with pytest.raises(ValueError, match=r"--merge_device='bogus': not a device"):
        resolve_device("bogus", arg="--merge_device")


def test_dtypes() -> None:
    assert resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(
        ValueError, match=r"--dtype='bf16': expected one of \['float32', 'bfloat16', 'float16'\]"
    ):
        resolve_dtype("bf16")


def test_the_training_dtypes_are_spelled_once() -> None:
    """LoRAModule's annotation (what LightningCLI checks and lists in --help) is the type whose
    names its __init__ checks: before, the two were written out separately."""
    from typing import get_type_hints

    from tclora._checks import TRAIN_DTYPES, TrainDtype
    from tclora.module import LoRAModule

    assert get_type_hints(LoRAModule.__init__)["dtype"] == TrainDtype
    assert TRAIN_DTYPES == ("float32", "bfloat16")


def test_tclora_eval_refuses_a_bad_device_first(capsys: pytest.CaptureFixture[str]) -> None:
    from tclora.study.eval_cli import eval_main

    with pytest.raises(SystemExit):
        eval_main(
            ["--base", "--model", "no/such-model", "--eval_sets", "x.jsonl", "--device", "tpu"]
        )
    assert "--device='tpu': not a device" in capsys.readouterr().err
