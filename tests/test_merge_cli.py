"""``tclora merge`` on saved adapter folders."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, merge_argv
from peft import LoraConfig, PeftModel, get_peft_model

from tclora.study.cli import MergeInputError, adapter_base_models, merge_main


@pytest.fixture
def adapter_folders(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> list[str]:
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    folders = []
    for k in range(3):
        torch.manual_seed(10 + k)
        model = get_peft_model(build_tiny_llama(len(tokenizer)), config)
        model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
        out = tmp_path / f"adapter_{k}"
        model.save_pretrained(out)
        folders.append(str(out))
    return folders


def test_merge_command_on_folders(
    tmp_path: Path,
    adapter_folders: list[str],
    multitask_jsonl: Path,
    tokenizer: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text(
        "".join(
            json.dumps({"prompt": f"{i} + 1 =", "choices": [str(i + 1), str(i + 2)], "answer": 0})
            + "\n"
            for i in range(4)
        )
    )
    out = tmp_path / "merged"
    val = json.dumps([{"path": str(multitask_jsonl), "max_samples": 8}])
    code = merge_main(
        merge_argv(
            adapter_folders,
            out,
            "--val_data",
            val,
            baselines=["uniform", "tsv"],
            scales=[0.5, 1.0],
            keep="best",
            references=["base", "single"],
            eval_sets=[str(heldout)],
            cp_iters=100,
        )
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "kept merge:" in printed and "| method |" in printed
    summary = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in summary["rows"]] == [
        "base",
        "single:adapter_0",
        "single:adapter_1",
        "single:adapter_2",
        "cp2_mean_loading",
        "uniform",
        "tsv",
    ]
    for row in summary["rows"][4:]:
        assert set(row["scale_curve"]) == {"0.5", "1.0"}
    loaded = PeftModel.from_pretrained(build_tiny_llama(len(tokenizer)), out / "merged_adapter")
    delta = loaded.base_model.model.model.layers[0].self_attn.q_proj.get_delta_weight("default")
    assert float(delta.norm()) > 0


def test_adapters_of_different_base_models_are_refused(
    tmp_path: Path, adapter_folders: list[str]
) -> None:
    config = Path(adapter_folders[1]) / "adapter_config.json"
    data = json.loads(config.read_text())
    data["base_model_name_or_path"] = "other/model"
    config.write_text(json.dumps(data))
    with pytest.raises(
        MergeInputError, match=r"adapters of different base models cannot be merged: .*other/model"
    ):
        adapter_base_models(adapter_folders)


def test_a_folder_that_is_not_an_adapter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        MergeInputError, match=r"is not a peft adapter folder \(no adapter_config.json\)"
    ):
        adapter_base_models([str(tmp_path), str(tmp_path)])


def test_one_adapter_is_refused(adapter_folders: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        merge_main(["--adapters", json.dumps(adapter_folders[:1]), "--output_dir", str(tmp_path)])


def _quick_merge(folders: list[str], out: Path | None, scales: str, *extra: str) -> int:
    return merge_main(merge_argv(folders, out, *extra, scales=json.loads(scales)))


def test_a_reused_output_folder_never_mixes_runs(
    tmp_path: Path,
    adapter_folders: list[str],
    multitask_jsonl: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before: a second merge into the same folder reported the first run's 3-adapter table."""
    out = tmp_path / "merged"
    val = ["--val_data", json.dumps([{"path": str(multitask_jsonl), "max_samples": 4}])]
    assert _quick_merge(adapter_folders, out, "[1.0, 2.0]", *val) == 0
    first = json.loads((out / "results.json").read_text())
    progress = json.loads((out / "merge_progress.json").read_text())
    assert progress["fingerprint"] == first["fingerprint"]
    assert first["adapters"] == ["adapter_0", "adapter_1", "adapter_2"]

    # the same study again: every row is reused, the numbers are the same
    with caplog.at_level("INFO"):
        assert _quick_merge(adapter_folders, out, "[1.0, 2.0]", *val) == 0
    assert "resuming, 3 rows of this very study already done" in caplog.text
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == first["rows"] and again["fingerprint"] == first["fingerprint"]

    # other adapters and another scale grid: a fresh study, the old files moved aside
    with pytest.warns(
        UserWarning,
        match=r"not resuming: .*merge_progress.json was written by a "
        r"different run \(adapters, options, validation differ\)",
    ):
        assert _quick_merge(adapter_folders[:2], out, "[0.5]") == 0
    second = json.loads((out / "results.json").read_text())
    assert second["adapters"] == ["adapter_0", "adapter_1"]
    assert second["fingerprint"] != first["fingerprint"]
    assert {r["scale"] for r in second["rows"] if r["kind"] == "merge"} == {0.5}
    (stale,) = out.glob("stale-*")
    assert json.loads((stale / "results.json").read_text()) == first
    assert (stale / "merged_adapter" / "adapter_model.safetensors").is_file()


def test_without_output_dir_every_run_gets_its_own_folder(
    tmp_path: Path, adapter_folders: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        assert _quick_merge(adapter_folders[:2], None, "[1.0]") == 0
    runs = sorted(p.name for p in (tmp_path / "runs" / "merge").iterdir())
    assert runs == ["version_0", "version_1"]
    for run in runs:
        assert (tmp_path / "runs" / "merge" / run / "results.json").is_file()


def test_adapters_accept_the_plain_list_form(tmp_path: Path, adapter_folders: list[str]) -> None:
    # `--adapters A B` (the documented form) and `--adapters '[A, B]'` give the same run
    assert _quick_merge(adapter_folders[:2], tmp_path / "a", "[1.0]") == 0
    listed = merge_argv([json.dumps(adapter_folders[:2])], tmp_path / "b")
    assert merge_main(listed) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["fingerprint"] == b["fingerprint"]


def test_a_truncated_adapter_file_names_its_folder(adapter_folders: list[str]) -> None:
    weights = Path(adapter_folders[1]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(
        MergeInputError,
        match=rf"adapter_model.safetensors' in folder '{adapter_folders[1]}' is unreadable .*"
        r"truncated or corrupt",
    ):
        adapter_base_models(adapter_folders)


def test_choices_on_validation_loss_without_validation_data_fail_before_loading(
    tmp_path: Path, adapter_folders: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --val_data the first scale and the first merge would be taken silently."""
    with pytest.raises(SystemExit):
        merge_main(merge_argv(adapter_folders, tmp_path / "m", scales=[1.0, 2.0], keep="best"))
    assert (
        "--merge.scales=[1.0, 2.0] (one scale per merge) and --merge.keep='best' (the merge to "
        "keep among ['cp2_mean_loading', 'uniform']) are chosen on validation loss, and there is "
        "no validation data: pass --val_data, or give a single scale and name the merge to keep "
        "(--merge.keep=<method>)"
    ) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        merge_main(merge_argv(adapter_folders, tmp_path / "m", keep="best"))
    assert "--merge.keep='best' (the merge to keep among" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_bad_device_or_dtype_is_refused_before_any_model_loads(
    adapter_folders: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Both are usage errors (exit 2, like ``tclora eval``'s), named with what is allowed."""
    argv = ["--adapters", json.dumps(adapter_folders), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        merge_main([*argv, "--dtype", "half"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(
        r"--dtype: invalid choice: 'half' \(choose from '?float32'?, '?bfloat16'?", err
    ), err
    with pytest.raises(SystemExit) as exit_info:
        merge_main([*argv, "--device", "tpu"])
    assert exit_info.value.code == 2
    assert "--device='tpu': not a device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_val_data_is_formatted_as_the_study_formats_its_prompts(
    tokenizer: Any, multitask_jsonl: Path
) -> None:
    """Before: ``--val_data`` was always chat-templated, whatever ``--merge.chat_template``."""
    from tclora.study.cli import _val_loader

    sources = [{"path": str(multitask_jsonl), "max_samples": 2}]
    plain = next(iter(_val_loader(sources, tokenizer, 64, 2, False)))
    chat = next(iter(_val_loader(sources, tokenizer, 64, 2, True)))
    assert tokenizer.decode(chat["input_ids"][0]).startswith("<|im_start|>")
    assert "<|im_start|>" not in tokenizer.decode(plain["input_ids"][0])
