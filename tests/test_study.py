"""The merge study without Lightning: options, scale choice, fingerprint and progress."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama
from peft import LoraConfig, get_peft_model

from tclora.evaluation import EvalExample, EvalSet
from tclora.merge import AdapterStack
from tclora.study import MethodResult, StudyConfig, select_scale
from tclora.study.progress import (
    PROGRESS_FILE,
    fingerprint_components,
    read_progress,
    retire_outputs,
    study_fingerprint,
    write_progress,
)


def test_select_scale_picks_the_lowest_finite_metric() -> None:
    assert select_scale({0.5: 2.0, 1.0: 1.5, 2.0: 1.5, 4.0: math.nan}) == 1.0
    with pytest.raises(ValueError, match="no finite validation metric"):
        select_scale({1.0: math.nan})


def _peft(seed: int = 0) -> Any:
    config = LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    torch.manual_seed(seed)
    model = get_peft_model(build_tiny_llama(64, seed=1), config, adapter_name="a")
    model.add_adapter("b", config)
    return model


def _components(model: Any, cfg: StudyConfig, sets: list[EvalSet], **kw: Any) -> dict[str, Any]:
    stack = AdapterStack.from_peft_model(model, ["a", "b"])
    tokenizer = kw.pop("tokenizer", _Tok())
    return fingerprint_components(
        stack=stack,
        model=model,
        tokenizer=tokenizer,
        cfg=cfg,
        eval_sets=sets,
        val_loaders=kw.pop("val_loaders", []),
        routing=False,
    )


class _Tok:
    name_or_path = "tok"
    bos_token = eos_token = pad_token = "<s>"
    chat_template = None

    def __len__(self) -> int:
        return 64


def _set(answer: str) -> list[EvalSet]:
    return [EvalSet("s", "exact_match", [EvalExample("q", (answer,), None, "t")], "s.jsonl")]


def test_fingerprint_covers_what_decides_the_rows() -> None:
    model = _peft()
    cfg = StudyConfig(scales=[1.0])
    base = study_fingerprint(_components(model, cfg, _set("x")))
    assert base == study_fingerprint(_components(model, cfg, _set("x")))
    # options that change no number leave it as it is
    quiet = StudyConfig(scales=[1.0], progress=False, export=False, keep="uniform")
    assert study_fingerprint(_components(model, quiet, _set("x"))) == base
    # nor does where the sets' files lie (their content is fingerprinted): before, a checkout
    # moved to another folder redid every row of a study that spans sessions
    for folder in ("/work/main/data", "/elsewhere/data"):
        moved = StudyConfig(scales=[1.0], eval_sets=[f"{folder}/s.jsonl"])
        assert study_fingerprint(_components(model, moved, _set("x"))) == base
    # each of these is a different study
    assert study_fingerprint(_components(model, cfg, _set("y"))) != base  # eval content
    assert study_fingerprint(_components(model, StudyConfig(scales=[2.0]), _set("x"))) != base
    batches = [[{"input_ids": torch.ones(1, 3, dtype=torch.long)}]]
    assert study_fingerprint(_components(model, cfg, _set("x"), val_loaders=batches)) != base
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["b"].weight.add_(1e-3)
    assert study_fingerprint(_components(model, cfg, _set("x"))) != base  # adapter weights
    other_base = _peft()
    with torch.no_grad():
        other_base.base_model.model.lm_head.weight.mul_(2.0)  # same adapters, another base
    assert study_fingerprint(_components(other_base, cfg, _set("x"))) != base


def test_the_source_digest_is_the_code_imported_not_the_files_now(tmp_path: Path) -> None:
    """Before: the digest was read from disk when a study started, so a file edited during a
    long fit stamped rows computed by the old code with the new code's digest."""
    import shutil
    import subprocess
    import sys

    import tclora

    shutil.copytree(Path(tclora.__file__).parent, tmp_path / "tclora")
    script = (
        "import tclora\n"
        "from tclora.study.progress import _code_versions\n"
        "before = _code_versions()['tclora_source']\n"
        "assert before == tclora._source_digest() == tclora.SOURCE_DIGEST\n"
        "with open(tclora.__file__, 'a') as f:\n"
        "    f.write('# edited while running\\n')\n"
        "assert _code_versions()['tclora_source'] == before\n"
        "assert tclora._source_digest() != before\n"
        "print('ok', tclora.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok {tmp_path / 'tclora' / '__init__.py'}"


def test_progress_round_trip_mismatch_and_retirement(tmp_path: Path) -> None:
    model = _peft()
    cfg = StudyConfig(scales=[1.0])
    mine = _components(model, cfg, _set("x"))
    rows = [MethodResult("uniform", "merge", scale=1.0, scores={"s": {"exact_match": 0.5}})]
    assert read_progress(tmp_path, mine) == ([], None)  # nothing there
    write_progress(tmp_path, mine, rows)
    assert read_progress(tmp_path, mine) == (rows, None)
    theirs = _components(model, StudyConfig(scales=[2.0]), _set("y"))
    assert read_progress(tmp_path, theirs) == (
        [],
        f"{tmp_path / PROGRESS_FILE} was written by a different run (eval_sets, options differ)",
    )
    (tmp_path / PROGRESS_FILE).write_text("{not json")
    found, reason = read_progress(tmp_path, mine)
    assert found == [] and reason is not None and "is unreadable (JSONDecodeError" in reason
    (tmp_path / "results.md").write_text("old")
    (tmp_path / "keep.txt").write_text("not ours")
    moved = retire_outputs(tmp_path)
    assert moved is not None and moved.name.startswith("stale-")
    assert sorted(p.name for p in moved.iterdir()) == [PROGRESS_FILE, "results.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", moved.name]
    assert retire_outputs(tmp_path) is None


def test_choices_on_validation_loss_need_validation_data() -> None:
    from torch.utils.data import DataLoader

    from tclora.study.run import has_validation_data

    assert not has_validation_data([])
    assert not has_validation_data([DataLoader([]), DataLoader([])])  # val_fraction=0
    assert has_validation_data([DataLoader([]), DataLoader([{"input_ids": 1}])])
    assert has_validation_data([iter([{"input_ids": 1}])])  # no length: assumed to have data

    config = StudyConfig(cp_ranks=[2], rules=["mean_loading"], baselines=["uniform"], scales=[1.0])
    with pytest.raises(
        ValueError,
        match=r"^keep='best' \(the merge to keep among \['cp2_mean_loading', 'uniform'\]\) is "
        r"chosen on validation loss, and there is no validation data: pass it, or give a single "
        r"scale and name the merge to keep \(keep=<method>\)$",
    ):
        config.check_validation(False, "pass it")
    config.check_validation(True, "pass it")
    StudyConfig(scales=[1.0], keep="uniform").check_validation(False, "pass it")
    only = StudyConfig(cp_ranks=[2], rules=["mean_loading"], baselines=[], scales=[1.0])
    only.check_validation(False, "pass it")  # one merge: nothing to choose


def test_an_empty_cluster_validation_loader_is_named() -> None:
    """Before: a cluster without validation samples dropped out of the metric silently."""
    from torch.utils.data import DataLoader

    from tclora.study.run import run_study

    model = _peft()
    stack = AdapterStack.from_peft_model(model, ["a", "b"])
    ids = torch.ones(1, 3, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": ids, "labels": ids}
    loaders = [DataLoader([]), DataLoader([batch], batch_size=None)]
    cfg = StudyConfig(
        cp_ranks=[1], rules=["mean_loading"], baselines=[], scales=[1.0], references=[]
    )
    with pytest.warns(
        UserWarning,
        match=r"merge study: validation loaders \[0\] \(of 2; one per cluster\) are empty: "
        r"val_loss is taken over the other 1, so the scales are chosen without those clusters",
    ):
        result = run_study(model, _Tok(), stack, cfg=cfg, val_loaders=loaders)
    assert math.isfinite(result.row("cp1_mean_loading").selection or math.nan)


def test_a_moved_model_and_tokenizer_keep_their_fingerprints(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Before: the study fingerprint and the token-lengths cache key held the folder the model
    and tokenizer were loaded from, so a checkout or cache on another path redid every row, and
    a tokenizer re-trained into the same folder kept its cached lengths."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tclora.clustering.cache import token_lengths_file
    from tclora.data import tokenizer_fingerprint
    from tclora.study.progress import model_digest

    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(tiny_model_dir, moved)
    tokenizers = [AutoTokenizer.from_pretrained(str(f)) for f in (tiny_model_dir, moved)]
    assert tokenizers[0].name_or_path != tokenizers[1].name_or_path
    assert tokenizer_fingerprint(tokenizers[0]) == tokenizer_fingerprint(tokenizers[1])
    keys = {token_lengths_file(tmp_path, "d" * 64, t, True) for t in tokenizers}
    assert len(keys) == 1
    models = [AutoModelForCausalLM.from_pretrained(str(f)) for f in (tiny_model_dir, moved)]
    assert model_digest(models[0]) == model_digest(models[1])

    tokenizers[1].add_tokens(["<new>"])  # another tokenizer, same folder name
    assert tokenizer_fingerprint(tokenizers[1]) != tokenizer_fingerprint(tokenizers[0])
    with torch.no_grad():
        models[1].model.norm.weight.mul_(2.0)
    assert model_digest(models[1]) != model_digest(models[0])


def test_arrow_over_adapters_of_different_ranks_is_refused_before_any_row() -> None:
    """Before: peft refused them when the Arrow row came, after every other row was scored."""
    from tclora.study.run import run_study

    torch.manual_seed(0)
    model = get_peft_model(
        build_tiny_llama(64, seed=1),
        LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False),
        adapter_name="a",
    )
    model.add_adapter("b", LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    stack = AdapterStack.from_peft_model(model, ["a", "b"])
    cfg = StudyConfig(scales=[1.0], keep="uniform", references=["arrow"])
    with pytest.raises(
        ValueError,
        match=r"references include 'arrow', which needs adapters of one LoRA rank .* module "
        r"'model\.layers\.0\.self_attn\.q_proj' has ranks \{'a': 2, 'b': 4\} \(2 such modules\)",
    ):
        run_study(model, _Tok(), stack, cfg=cfg)
