"""lm-evaluation-harness as an evaluator, and as the referee of tclora's scorer.

The referee tests write multiple-choice JSONL sets, score them with tclora's scorer and with
``lm_eval.simple_evaluate`` (on the same in-memory model) and compare every item's
log-likelihoods (<= 1e-4) and both predictions (``acc``, ``acc_norm``). Everything is local: the
lm-eval tasks are YAML files written by the test (``dataset_path: json``), never hub tasks.
Tests that need lm-eval are skipped, with the install command as the reason, when the
``tclora[harness]`` extra is missing (``make install`` installs it, so CI runs them).

Run as a script, this file is the DDP worker of ``test_ddp_harness_is_sharded_and_exact``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama, free_port

from tclora.evaluation import (
    HarnessError,
    HarnessTask,
    as_harness_task,
    choice_predictions,
    evaluate,
    harness_evaluate,
    harness_installed,
    load_eval_set,
    load_harness_task,
    run_harness,
    score_choices,
    write_harness_task,
)
from tclora.evaluation.sets import EvalSet, EvalSetError

needs_harness = pytest.mark.skipif(
    not harness_installed(),
    reason="lm-evaluation-harness is not installed: pip install 'tclora[harness]'",
)

ROWS: list[dict[str, Any]] = [
    {"prompt": "Is the sky blue? Answer yes or no.", "choices": ["yes", "no"], "answer": 0},
    {"prompt": "Pick the colour of grass: ", "choices": ["green", "red", "purple"], "answer": 0},
    {"prompt": "Which number is even?\n", "choices": ["7", "8"], "answer": 1},
    {
        "prompt": [
            {"role": "system", "content": "Answer with a letter."},
            {"role": "user", "content": "2 + 2 = ?\nA: 3\nB: 4\nC: 22"},
        ],
        "choices": ["A", "B", "C"],
        "answer": "B",
    },
    {"prompt": [{"role": "user", "content": "Capital of France?"}], "choices": ["Paris", "Rome"]},
    {
        "prompt": "Which is a fruit?",
        "choices": ["apple", "chair", "a window", "cloud"],
        "answer": 0,
    },
    # longer than max_length=40 tokens: both evaluators truncate the context from the left
    {"prompt": "Count the words in this sentence please. " * 6, "choices": ["six", "many"]},
]
for _row in ROWS:
    _row.setdefault("answer", 0)
MAX_LENGTH = 40


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def mc_set(tmp_path: Path) -> EvalSet:
    return load_eval_set(write_jsonl(tmp_path / "referee.jsonl", ROWS))


def referee(
    model: Any, tokenizer: Any, es: EvalSet, folder: Path, chat: bool, **kw: Any
) -> tuple[list[list[float]], list[list[float]], list[dict[str, Any]]]:
    """Per-item log-likelihoods from both evaluators, and lm-eval's per-document records."""
    task = as_harness_task(es, folder, chat=chat)
    run = run_harness(model, tokenizer, task, chat_template=chat, log_samples=True, **kw)
    ours = score_choices(model, tokenizer, es.examples, chat_template=chat, **kw)
    assert [s["doc_id"] for s in run.samples] == list(range(len(es)))
    return [s["logliks"] for s in run.samples], [ll for ll, _ in ours], run.samples


def assert_same_scores(
    es: EvalSet, theirs: list[list[float]], ours: list[list[float]], samples: list[Any]
) -> float:
    """Log-likelihoods within 1e-4 and identical acc / acc_norm per item; returns max |Δ|."""
    worst = 0.0
    for ex, a, b, sample in zip(es.examples, theirs, ours, samples, strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=1e-4)
        worst = max(worst, max(abs(x - y) for x, y in zip(a, b, strict=True)))
        pred, pred_norm = choice_predictions(b, [len(c) for c in ex.choices or ()])
        assert sample["metrics"] == {
            "acc": float(pred == ex.gold),
            "acc_norm": float(pred_norm == ex.gold),
        }
    return worst


# ------------------------------------------------------------------------------------------------
# Referee
# ------------------------------------------------------------------------------------------------


@needs_harness
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_referee_tiny_model_same_logliks_and_predictions(
    tmp_path: Path, tiny_llama: Any, tokenizer: Any, mc_set: EvalSet, chat: bool
) -> None:
    kw = {"max_length": MAX_LENGTH, "batch_size": 3}
    theirs, ours, samples = referee(tiny_llama, tokenizer, mc_set, tmp_path / "t", chat, **kw)
    assert_same_scores(mc_set, theirs, ours, samples)
    # the long item was truncated (else max_length would not matter): its scores change with it
    longer = score_choices(tiny_llama, tokenizer, mc_set.examples[-1:], chat_template=chat)
    assert abs(longer[0][0][0] - ours[-1][0]) > 1e-3
    # the aggregated numbers agree too, through both public entry points
    task = load_harness_task(f"lm_eval:{tmp_path / 't' / 'tclora_referee.yaml'}")
    ours_acc = evaluate(tiny_llama, tokenizer, mc_set, chat_template=chat, progress=False, **kw)
    theirs_acc = harness_evaluate(tiny_llama, tokenizer, task, chat_template=chat, **kw)
    assert theirs_acc == ours_acc


def _bos_tokenizer() -> Any:
    """A character tokenizer that adds BOS and whose chat template does not start with it."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
        "<|user|>",
        "<|system|>",
        "<|assistant|>",
        "<|end|>",
    ]
    vocab = {w: i for i, w in enumerate(specials)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)]
    )
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.add_special_tokens({"additional_special_tokens": specials[4:]})
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return tok


@needs_harness
def test_bos_under_a_chat_template_is_the_one_convention_that_differs(
    tmp_path: Path, mc_set: EvalSet
) -> None:
    tok = _bos_tokenizer()
    assert tok("ab")["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS itself
    model = build_tiny_llama(len(tok), seed=3)
    es = EvalSet("bos", "multiple_choice", mc_set.examples[:3], "bos")
    for chat in (False, True):
        task = as_harness_task(es, tmp_path / f"t{chat}", chat=chat)
        ours = [ll for ll, _ in score_choices(model, tok, es.examples, chat_template=chat)]
        for conventions in ("tclora", "lm_eval"):
            run = run_harness(
                model, tok, task, chat_template=chat, log_samples=True, conventions=conventions
            )
            theirs = [s["logliks"] for s in run.samples]
            if chat and conventions == "lm_eval":
                # lm-eval encodes templated text with the tokenizer's special tokens unless it
                # starts with the BOS text: one BOS more than tclora (and training) put there
                gaps = [
                    abs(x - y)
                    for a, b in zip(theirs, ours, strict=True)
                    for x, y in zip(a, b, strict=True)
                ]
                assert max(gaps) > 1e-3
            else:
                for a, b in zip(theirs, ours, strict=True):
                    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    with pytest.raises(
        ValueError, match=r"conventions='harness': expected one of \['tclora', 'lm_eval'\]"
    ):
        run_harness(model, tok, task, conventions="harness")  # type: ignore[arg-type]


@needs_harness
@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat_template"])
def test_referee_smollm2_on_registry_tasks(
    tmp_path: Path, smollm2_dir: Path, tokenizer: Any, chat: bool
) -> None:
    import time

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    start = time.perf_counter()
    worst = 0.0
    for name in ("food", "regex-match"):
        es = load_eval_set(f"registry:{name}", max_items=50, seed=0)
        theirs, ours, samples = referee(
            model, tokenizer, es, tmp_path / name, chat, max_length=512, batch_size=8
        )
        worst = max(worst, assert_same_scores(es, theirs, ours, samples))
    print(
        f"\nSmolLM2 referee ({'chat' if chat else 'plain'}): max |Δ loglik| {worst:.2e}, "
        f"{time.perf_counter() - start:.0f} s for 2 x 50 items"
    )


# ------------------------------------------------------------------------------------------------
# Loading and errors
# ------------------------------------------------------------------------------------------------


def test_lm_eval_set_without_the_extra_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tclora.evaluation import harness
    from tclora.study import StudyConfig
    from tclora.study.study import MergeStudy

    monkeypatch.setattr(harness, "harness_installed", lambda: False)
    study = MergeStudy(StudyConfig(eval_sets=["lm_eval:arc_easy"]))
    with pytest.raises(
        HarnessError,
        match=r"^eval set 'lm_eval:arc_easy' needs lm-evaluation-harness, which is not "
        r"installed; install the extra: pip install 'tclora\[harness\]'  \(lm-eval==0\.4\.13\)$",
    ):
        study.load_eval_sets()


@needs_harness
def test_lm_eval_set_errors(tmp_path: Path, mc_set: EvalSet) -> None:
    with pytest.raises(HarnessError, match=r"^eval set 'lm_eval: ' names no task; write lm_eval:"):
        load_harness_task("lm_eval: ")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(HarnessError, match=rf"task file not found: {missing}$"):
        load_harness_task(f"lm_eval:{missing}")
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "task: broken\ndataset_path: json\ndataset_kwargs: {data_files: {test: /x.jsonl}}\n"
        "test_split: test\noutput_type: multiple_choice\n"
    )
    with pytest.raises(HarnessError, match=r"lm-eval could not load the task \("):
        load_harness_task(f"lm_eval:{broken}")
    with pytest.raises(ValueError, match=r"max_items must be a positive integer or None, got 0"):
        load_harness_task(f"lm_eval:{broken}", max_items=0)
    exact = EvalSet("em", "exact_match", [], "em")
    with pytest.raises(HarnessError, match=r"'em' is exact_match; only multiple-choice sets"):
        write_harness_task(exact, tmp_path, chat=False)
    three_turns = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    es = load_eval_set(write_jsonl(tmp_path / "turns.jsonl", [{**ROWS[0], "prompt": three_turns}]))
    with pytest.raises(
        HarnessError, match=r"item 0: a prompt with turns \['user', 'assistant', 'user'\]"
    ):
        write_harness_task(es, tmp_path / "t", chat=True)
    write_harness_task(es, tmp_path / "t", chat=False)  # plain text joins the turns, as tclora


@needs_harness
@pytest.mark.slow
def test_lm_eval_registry_names_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are looked up in lm-eval's task index (built once, seconds); hub data offline fail
    with the reason, before any model work."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        HarnessError,
        match=r"^eval set 'lm_eval:arc_eazy': lm-eval 0\.4\.13 has no task 'arc_eazy'; similar "
        r"names: \['arc_easy'.*\]; for a task file of your own write lm_eval:<path>\.yaml$",
    ):
        load_harness_task("lm_eval:arc_eazy")
    try:
        task = load_harness_task("lm_eval:arc_easy", max_items=3)
    except HarnessError as err:  # the usual case here: no network, no warm datasets cache
        assert "lm-eval could not load the task" in str(err)
        assert "a hub dataset needs the network or a warm datasets cache" in str(err)
    else:  # a machine with the dataset cached
        assert task.task_name == "arc_easy" and len(task.doc_ids) == 3


@needs_harness
def test_harness_task_subsample_views_and_fingerprint(tmp_path: Path, mc_set: EvalSet) -> None:
    from tclora.study.progress import eval_sets_digest

    path = write_harness_task(mc_set, tmp_path / "t", chat=True)
    task = load_harness_task(f"lm_eval:{path}", max_items=4, seed=1)
    again = load_harness_task(f"lm_eval:{path}", max_items=4, seed=1)
    assert isinstance(task, HarnessTask) and task.name == task.task_name == "tclora_referee"
    assert (
        task.doc_ids == again.doc_ids
        and len(task.doc_ids) == 4
        and task.doc_ids == sorted(task.doc_ids)
    )
    assert task.tclora_unsupported is None and task.kind == "multiple_choice"
    # the views are tclora's own items: system messages come back from lm-eval's description
    for doc_id, ex in zip(task.doc_ids, task.examples, strict=True):
        item = mc_set.examples[doc_id]
        prompt = item.prompt
        if isinstance(prompt, list) and len(prompt) == 1:  # a lone user message is its text
            prompt = prompt[0]["content"]
        assert (ex.prompt, ex.choices, ex.gold) == (prompt, item.choices, item.gold)
    digest = eval_sets_digest([task])
    assert eval_sets_digest([again]) == digest
    rows = [dict(r) for r in ROWS]
    rows[task.doc_ids[0]]["choices"] = ["yes", "no", "maybe"]
    edited = load_eval_set(write_jsonl(tmp_path / "referee.jsonl", rows))
    changed = load_harness_task(
        f"lm_eval:{write_harness_task(edited, tmp_path / 'u', chat=True)}", max_items=4, seed=1
    )
    assert eval_sets_digest([changed]) != digest


# ------------------------------------------------------------------------------------------------
# The merge study with lm-eval tasks
# ------------------------------------------------------------------------------------------------


class _Router:
    """Routes even-length prompts to adapter ``c0``, odd ones to ``c1``."""

    cluster_names = ["c0", "c1"]

    def embed(self, texts: list[str]) -> Any:
        import numpy as np

        return np.array([[len(t) % 2] for t in texts], dtype=np.float32)

    def assign(self, embeddings: Any) -> Any:
        return embeddings[:, 0].astype(int)


@needs_harness
def test_study_scores_lm_eval_tasks_like_its_own_sets(
    tmp_path: Path, tokenizer: Any, mc_set: EvalSet
) -> None:
    """Every variant (base, single adapters, routing, merges) scores one set the same twice:
    by tclora's scorer (the JSONL) and by lm-eval (the same items as an lm-eval task)."""
    from peft import LoraConfig, get_peft_model

    from tclora.study import StudyConfig
    from tclora.study.study import MergeStudy

    config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(build_tiny_llama(len(tokenizer), seed=2), config, adapter_name="c0")
    model.add_adapter("c1", config)
    model.set_adapter("c0")
    yaml_path = write_harness_task(mc_set, tmp_path / "tasks", chat=True)
    cfg = StudyConfig(
        cp_ranks=[2],
        rules=["mean_loading"],
        baselines=["uniform"],
        keep="uniform",  # no validation data to choose with
        eval_sets=[mc_set.source, f"lm_eval:{yaml_path}"],
        references=["base", "single", "routing"],
        max_length=MAX_LENGTH,
        batch_size=4,
        cp_iters=5,
        progress=False,
        export=False,
    )
    study = MergeStudy(cfg)
    sets = study.load_eval_sets()
    assert [type(s).__name__ for s in sets] == ["EvalSet", "HarnessTask"]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    result = study.run(model, tokenizer, out_dir=tmp_path / "out", router=_Router())
    assert [r.name for r in result.rows] == [
        "base",
        "single:c0",
        "single:c1",
        "routing",
        "cp2_mean_loading",
        "uniform",
    ]
    assert result.eval_sets == ["referee", "tclora_referee"]
    for row in result.rows:
        assert row.scores["tclora_referee"] == row.scores["referee"], row.name
    assert model.training and model.active_adapter == "c0"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    table = (tmp_path / "out" / "results.md").read_text()
    assert "tclora_referee" in table
    # a second set of the same name is refused before any work
    clash = MergeStudy(StudyConfig(eval_sets=[mc_set.source, mc_set.source]))
    with pytest.raises(EvalSetError, match=r"are all named 'referee'; every evaluation set"):
        clash.load_eval_sets()


# ------------------------------------------------------------------------------------------------
# DDP: sharded over ranks, equal to one process
# ------------------------------------------------------------------------------------------------

WORLD_SIZE = 2


def _ddp_worker(rank: int, port: int, tokenizer_dir: str, yaml_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    os.environ["LOCAL_RANK"] = str(rank)  # as Lightning's launcher sets it
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        from transformers import AutoTokenizer

        from tclora.evaluation import harness

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = build_tiny_llama(len(tokenizer))
        task = load_harness_task(f"lm_eval:{yaml_path}")
        lm_class = harness._lm_class()
        original = lm_class.loglikelihood
        requests: list[int] = []

        def counting(self: Any, reqs: list[Any], *args: Any, **kwargs: Any) -> Any:
            requests.append(len(reqs))
            return original(self, reqs, *args, **kwargs)

        lm_class.loglikelihood = counting
        result = harness_evaluate(model, tokenizer, task, max_length=MAX_LENGTH, batch_size=2)
        record: dict[str, Any] = {"result": result, "requests": list(requests)}
        # one document for two ranks: rank zero scores it alone, every rank returns its numbers
        one = run_harness(model, tokenizer, task, doc_ids=[3], max_length=MAX_LENGTH)
        record["one"] = {"metrics": one.metrics, "n": one.n, "requests": requests[1:]}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


@needs_harness
@pytest.mark.slow
def test_ddp_harness_is_sharded_and_exact(
    tmp_path: Path, tiny_llama: Any, tokenizer: Any, smollm2_dir: Path, mc_set: EvalSet
) -> None:
    yaml_path = write_harness_task(mc_set, tmp_path / "tasks", chat=True)
    task = load_harness_task(f"lm_eval:{yaml_path}")
    single = harness_evaluate(tiny_llama, tokenizer, task, max_length=MAX_LENGTH, batch_size=2)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, str(smollm2_dir), str(yaml_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)]
    one = run_harness(tiny_llama, tokenizer, task, doc_ids=[3], max_length=MAX_LENGTH)
    for record in ranks:
        assert record["result"] == single  # every rank returns the single-process numbers
        assert (record["one"]["metrics"], record["one"]["n"]) == (one.metrics, 1)
    assert [r["one"]["requests"] for r in ranks] == [[3], []]  # document 3 has 3 choices
    # 18 choices in all: rank 0 scored documents 0, 2, 4, 6 (8 choices, padded by lm-eval to
    # rank 1's count), rank 1 documents 1, 3, 5 (10 choices)
    assert [r["requests"] for r in ranks] == [[10], [10]]


if __name__ == "__main__":
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    mp.spawn(_ddp_worker, args=(free_port(), *sys.argv[1:4]), nprocs=WORLD_SIZE, join=True)


# ------------------------------------------------------------------------------------------------
# tclora eval
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_adapters(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> list[str]:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folders = []
    for k in range(2):
        torch.manual_seed(20 + k)
        model = get_peft_model(build_tiny_llama(len(tokenizer)), config)
        model.peft_config["default"].base_model_name_or_path = str(tiny_model_dir)
        model.save_pretrained(tmp_path / f"adapter_{k}")
        folders.append(str(tmp_path / f"adapter_{k}"))
    return folders


@needs_harness
def test_eval_command_scores_adapter_folders_with_both_evaluators(
    tmp_path: Path, saved_adapters: list[str], mc_set: EvalSet, capsys: pytest.CaptureFixture[str]
) -> None:
    from tclora.study.eval_cli import eval_main

    out = tmp_path / "eval"
    argv = ["--adapters", *saved_adapters, "--base", "--eval_sets", mc_set.source]
    argv += ["--evaluator", "both", "--max_length", str(MAX_LENGTH), "--quiet"]
    assert eval_main([*argv, "--output_dir", str(out)]) == 0
    record = json.loads((out / "eval_results.json").read_text())
    assert list(record["scores"]) == ["base", "adapter_0", "adapter_1"]
    for variant, by_evaluator in record["scores"].items():
        assert by_evaluator["lm_eval"] == by_evaluator["tclora"], variant
        assert by_evaluator["tclora"]["referee"]["n"] == len(mc_set)
    accs = {v: record["scores"][v]["tclora"]["referee"]["acc"] for v in record["scores"]}
    assert accs["adapter_0"] != accs["base"]  # the adapter was really applied
    table = (out / "eval_results.md").read_text()
    assert table.splitlines()[0] == "| model | evaluator | referee | average |"
    assert len(table.splitlines()) == 2 + 3 * 2
    assert "results in" in capsys.readouterr().out


def test_eval_command_checks_inputs_before_loading(
    tmp_path: Path,
    saved_adapters: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tclora.evaluation import harness
    from tclora.study.eval_cli import eval_main

    em = write_jsonl(tmp_path / "em.jsonl", [{"prompt": "2 + 2 = ?", "ideal": "4"}])
    with pytest.raises(SystemExit):
        eval_main(["--eval_sets", str(em)])
    assert "nothing to score: give --adapters FOLDER ... and/or --base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eval_main(["--base", "--eval_sets", str(em)])
    assert "--model: the base model to score; needed when no --adapters" in capsys.readouterr().err
    if harness_installed():
        with pytest.raises(SystemExit):
            eval_main(
                ["--adapters", saved_adapters[0], "--eval_sets", str(em), "--evaluator", "lm_eval"]
            )
        assert (
            "--evaluator lm_eval: set 'em' is exact_match; lm-eval scores tclora's "
            "multiple-choice sets only (use --evaluator tclora)"
        ) in capsys.readouterr().err
    monkeypatch.setattr(harness, "harness_installed", lambda: False)
    with pytest.raises(HarnessError, match=r"^--evaluator both needs lm-evaluation-harness"):
        eval_main(["--adapters", saved_adapters[0], "--eval_sets", str(em), "--evaluator", "both"])
