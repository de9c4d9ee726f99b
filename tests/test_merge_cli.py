"""``tclora merge`` on saved adapter folders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model

from tclora.merge_cli import MergeInputError, adapter_base_models, merge_main


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
    code = merge_main(
        [
            "--adapters",
            json.dumps(adapter_folders),
            "--val_data",
            json.dumps([{"path": str(multitask_jsonl), "max_samples": 8}]),
            "--output_dir",
            str(out),
            "--merge.cp_ranks",
            "[2]",
            "--merge.rules",
            "[mean_loading]",
            "--merge.baselines",
            "[uniform, tsv]",
            "--merge.scales",
            "[0.5, 1.0]",
            "--merge.references",
            "[base, single]",
            "--merge.eval_sets",
            json.dumps([str(heldout)]),
            "--merge.max_length",
            "64",
            "--merge.progress",
            "false",
        ]
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
