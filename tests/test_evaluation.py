"""Tests of tclora.evaluation: log-likelihood scoring, exact match, loaders, routing, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import build_tiny_llama

from tclora.evaluation import (
    AccuracyCounter,
    EvalExample,
    EvalSet,
    EvalSetError,
    answers_beyond_budget,
    choice_predictions,
    encode_pair,
    evaluate,
    generate_answers,
    is_exact_match,
    load_eval_set,
    normalize_answer,
    render_prompt,
    score_choices,
)

MC_ROWS: list[dict[str, Any]] = [
    {"prompt": "Is the sky blue? Answer yes or no.", "choices": ["yes", "no"], "answer": 0},
    {
        "prompt": [
            {"role": "system", "content": "Answer with a letter."},
            {"role": "user", "content": "2 + 2 = ?\nA: 3\nB: 4\nC: 22"},
        ],
        "choices": ["A", "B", "C"],
        "answer": "B",
    },
    {"prompt": "Pick the colour of grass.", "choices": ["green", "red", "purple"], "answer": 0},
    {"input": "Capital of France?", "choices": ["Paris", "Rome", "a big city"], "answer": 0},
    {"prompt": "Is fire cold?", "choices": ["yes", "no"], "answer": "no", "task": "facts"},
    {"prompt": "Which is a fruit?", "choices": ["apple", "chair", "window", "cloud"], "answer": 0},
    {"prompt": "Which number is even? " * 3, "choices": ["7", "8"], "answer": 1},
]

EM_PROMPTS = [
    "What is the capital of Italy?",
    "Name a primary colour, please.",
    "Complete: the quick brown fox jumps over the lazy",
    "Q: 3 + 4 = ?",
    "Translate 'cat' to French.",
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def build_models(vocab_size: int) -> tuple[Any, Any]:
    """An untied tiny Llama (varied greedy outputs) and a peft copy with two random LoRAs."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(vocab_size, seed=1, tie_word_embeddings=False)
    base = build_tiny_llama(vocab_size, seed=1, tie_word_embeddings=False)
    torch.manual_seed(2)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(base, config, adapter_name="c0")
    peft_model.add_adapter("c1", config)
    with torch.no_grad():  # make adapter "c1" clearly different from "c0"
        for name, p in peft_model.named_parameters():
            if ".lora_B.c1." in name:
                p.mul_(-3.0)
    return model, peft_model


@pytest.fixture
def mc_set(tmp_path: Path) -> EvalSet:
    return load_eval_set(write_jsonl(tmp_path / "mc.jsonl", MC_ROWS))


def hand_loglik(model: Any, tokenizer: Any, context: str, continuation: str, chat: bool) -> float:
    """Sum of log p(continuation token | prefix), with the harness' whitespace rule, by hand."""
    stripped = context.rstrip()
    moved = context[len(stripped) :] + continuation
    ctx = tokenizer(stripped, add_special_tokens=not chat)["input_ids"]
    whole = tokenizer(stripped + moved, add_special_tokens=not chat)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[p - 1, whole[p]] for p in range(len(ctx), len(whole))))


# ------------------------------------------------------------------------------------------------
# Log-likelihood scoring
# ------------------------------------------------------------------------------------------------


def test_score_choices_equals_hand_computation(tiny_llama: Any, tokenizer: Any) -> None:
    example = EvalExample("Is water wet?", ("yes",), ("yes", "no", "no, never"), "t")
    rows_seen: list[int] = []
    hook = tiny_llama.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    try:
        ((logliks, lengths),) = score_choices(tiny_llama, tokenizer, [example])
    finally:
        hook.remove()
    # "yes" and "no" are one token each: they share one input row; "no, never" is the other.
    # The context common to both rows runs once first (1 row), then the 2 rows' remainders.
    assert rows_seen == [1, 2]
    context = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is water wet?"}], tokenize=False, add_generation_prompt=True
    )
    assert context.endswith("<|im_start|>assistant\n")
    expected = [hand_loglik(tiny_llama, tokenizer, context, c, chat=True) for c in example.choices]
    torch.testing.assert_close(torch.tensor(logliks), torch.tensor(expected), rtol=0, atol=1e-4)
    assert lengths == [3, 2, 9]  # characters of the choice text, as lm-eval-harness' completion_len

    # Under the chat template the continuation is the bare choice, after the template's "\n".
    ctx_ids, cont_ids = encode_pair(tokenizer, context, "yes", add_special_tokens=False)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert cont_ids == newline + tokenizer("yes", add_special_tokens=False)["input_ids"]
    assert ctx_ids == tokenizer(context.rstrip(), add_special_tokens=False)["input_ids"]


def test_score_choices_plain_text_uses_space_delimiter(tiny_llama: Any, tokenizer: Any) -> None:
    example = EvalExample("The sky is", ("blue",), ("blue", "made of cheese"), "t")
    ((logliks, _),) = score_choices(tiny_llama, tokenizer, [example], chat_template=False)
    expected = [
        hand_loglik(tiny_llama, tokenizer, "The sky is", " " + c, chat=False)
        for c in example.choices
    ]
    torch.testing.assert_close(torch.tensor(logliks), torch.tensor(expected), rtol=0, atol=1e-4)
    assert render_prompt(tokenizer, "The sky is", chat_template=False) == "The sky is"
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_prompt(tokenizer, messages, chat_template=False) == "S\nU"


@pytest.mark.parametrize("chat_template", [True, False])
def test_training_and_evaluation_render_prompts_alike(tokenizer: Any, chat_template: bool) -> None:
    # Before: plain chat messages were joined by "\n" for training and "\n\n" for evaluation.
    from tclora.data import Sample, TokenizedSamples

    prompts: list[Any] = [
        "Plain question?",
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    ]
    samples = [Sample(p, "answer", "t") for p in prompts]
    training = TokenizedSamples(samples, torch.zeros(2), tokenizer, 64, chat_template)
    for sample in samples:
        rendered = render_prompt(tokenizer, sample.prompt, chat_template)
        assert training.render_prompt(sample) == rendered
        prompt_ids, _ = training.token_ids(samples.index(sample))
        assert prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected = "Be brief.\nWhy?" if not chat_template else None
    if expected is not None:
        assert render_prompt(tokenizer, prompts[1], chat_template) == expected


def test_score_choices_left_truncates_to_max_length(tiny_llama: Any, tokenizer: Any) -> None:
    prompt = "one two three four five six seven eight nine ten eleven twelve"
    example = EvalExample(prompt, ("thirteen",), ("thirteen", "zero"), "t")
    with pytest.warns(
        UserWarning,
        match=r"evaluation: 1 of 1 prompts \(e\.g\. item 0\) are longer than max_length=6 "
        r"tokens \(with the choice, for multiple choice\) and lose their first tokens",
    ):
        ((logliks, _),) = score_choices(
            tiny_llama, tokenizer, [example], chat_template=False, max_length=6
        )
    with pytest.warns(UserWarning, match=r"evaluation: 1 of 2 prompts \(e\.g\. item 1\)"):
        generate_answers(tiny_llama, tokenizer, ["one", prompt], chat_template=False, max_length=6)
    for choice, value in zip(example.choices, logliks, strict=True):
        ctx, cont = encode_pair(tokenizer, prompt, " " + choice, add_special_tokens=True)
        window = (ctx + cont)[-7:]
        with torch.no_grad():
            logprobs = torch.log_softmax(tiny_llama(torch.tensor([window[:-1]])).logits[0], -1)
        n = len(cont)
        targets = torch.tensor(window[-n:])
        expected = logprobs[len(window) - 1 - n :].gather(-1, targets[:, None]).sum()
        torch.testing.assert_close(torch.tensor(value), expected, rtol=0, atol=1e-4)


def assert_same_scores(got: Any, expected: Any, atol: float) -> None:
    """Two ``score_choices`` results: the same choice lengths, log-likelihoods within ``atol``."""
    assert [lengths for _, lengths in got] == [lengths for _, lengths in expected]
    torch.testing.assert_close(
        torch.tensor([x for ll, _ in got for x in ll]),
        torch.tensor([x for ll, _ in expected for x in ll]),
        rtol=0,
        atol=atol,
    )


def test_batched_scores_equal_unbatched(tiny_llama: Any, tokenizer: Any, mc_set: EvalSet) -> None:
    one = score_choices(tiny_llama, tokenizer, mc_set.examples, batch_size=1)
    for batch_size in (3, 64):
        many = score_choices(tiny_llama, tokenizer, mc_set.examples, batch_size=batch_size)
        assert_same_scores(many, one, atol=1e-4)
    # the same numbers without logits_to_keep (a model whose forward lacks it): full logits
    import tclora.evaluation.scoring as scoring

    original = scoring._supports_logits_to_keep
    scoring._supports_logits_to_keep = lambda model: False  # type: ignore[assignment]
    try:
        full = score_choices(tiny_llama, tokenizer, mc_set.examples, batch_size=3)
    finally:
        scoring._supports_logits_to_keep = original  # type: ignore[assignment]
    assert_same_scores(full, one, atol=1e-4)


def test_choice_predictions_by_hand() -> None:
    # acc picks the larger sum; acc_norm divides by characters: -4/1 = -4 < -6/6 = -1
    assert choice_predictions([-4.0, -6.0], [1, 6]) == (0, 1)
    assert choice_predictions([-2.0, -2.0, -9.0], [2, 2, 3]) == (0, 0)  # ties: first index
    with pytest.raises(ValueError, match="non-empty and of equal length, got 2 and 1"):
        choice_predictions([-1.0, -2.0], [1])


def test_evaluate_multiple_choice_matches_scores(
    tiny_llama: Any, tokenizer: Any, mc_set: EvalSet
) -> None:
    scores = score_choices(tiny_llama, tokenizer, mc_set.examples)
    preds = [choice_predictions(ll, n) for ll, n in scores]
    golds = [ex.gold for ex in mc_set.examples]
    acc = sum(p == g for (p, _), g in zip(preds, golds, strict=True)) / len(golds)
    acc_norm = sum(p == g for (_, p), g in zip(preds, golds, strict=True)) / len(golds)
    tiny_llama.train()
    result = evaluate(tiny_llama, tokenizer, mc_set, batch_size=4, progress=False)
    assert result == {"acc": acc, "acc_norm": acc_norm, "n": 7}
    assert tiny_llama.training  # training mode restored
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_accuracy_counter_is_exact() -> None:
    counter = AccuracyCounter(["acc", "acc_norm"], sync_on_compute=False)
    counter.update(torch.tensor([[1, 0], [1, 1], [0, 0]]))
    counter.update(torch.zeros((0, 2), dtype=torch.long))
    out = counter.compute()
    assert (float(out["acc"]), float(out["acc_norm"]), int(out["n"])) == (2 / 3, 1 / 3, 3)


# ------------------------------------------------------------------------------------------------
# Exact match
# ------------------------------------------------------------------------------------------------


def test_normalize_answer_and_exact_match() -> None:
    assert normalize_answer("  Paris.  ") == "paris"
    assert normalize_answer("The   Answer\tIS 42!?") == "the answer is 42"
    assert normalize_answer("STRASSE") == normalize_answer("straße")  # casefold, not lower
    assert normalize_answer("東京。") == "東京"
    assert normalize_answer("(a)") == "(a"  # only trailing punctuation goes
    assert is_exact_match("Rome!", ["Paris", " rome "])
    assert not is_exact_match("Rome is", ["rome"])


def test_answers_beyond_the_generation_budget_are_named(tokenizer: Any, tmp_path: Path) -> None:
    """An exact-match item whose every answer needs more than max_new_tokens tokens can never
    match: evaluate says how many, before scoring (trailing punctuation does not count)."""
    three = tokenizer.decode(tokenizer("one two three", add_special_tokens=False)["input_ids"])
    n_three = len(tokenizer(three, add_special_tokens=False)["input_ids"])
    long = " ".join([three] * 3)
    answers = [(three + ".",), (long,), (long, three), (long + "!",)]
    assert answers_beyond_budget(tokenizer, answers, n_three) == [1, 3]
    assert answers_beyond_budget(tokenizer, answers, 100) == []
    rows = [{"prompt": f"q{i}", "ideal": list(a)} for i, a in enumerate(answers)]
    em = load_eval_set(write_jsonl(tmp_path / "em.jsonl", rows))
    model, _ = build_models(len(tokenizer))
    with pytest.warns(
        UserWarning,
        match=rf"eval set 'em': 2 of 4 examples have no answer that fits in "
        rf"max_new_tokens={n_three} tokens \(e.g. example 1\), so they can never be an exact "
        "match; raise max_new_tokens",
    ):
        evaluate(model, tokenizer, em, max_new_tokens=n_three, chat_template=False, progress=False)


def test_exact_match_generation_batched_equals_unbatched(tokenizer: Any, tmp_path: Path) -> None:
    model, _ = build_models(len(tokenizer))
    unbatched = []
    for prompt in EM_PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=2)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        unbatched.append(next(line for line in text.strip().splitlines() if line.strip()).strip())
    assert all(unbatched) and len(set(unbatched)) > 1
    batched = generate_answers(
        model, tokenizer, EM_PROMPTS, batch_size=3, max_new_tokens=4, chat_template=False
    )
    assert batched == unbatched
    # ideal = the model's own answer (case/punctuation changed) for 3 items, wrong for 2
    rows: list[dict[str, Any]] = []
    for i, (prompt, answer) in enumerate(zip(EM_PROMPTS, unbatched, strict=True)):
        if i == 1:  # right answer second in a list of acceptable answers
            rows.append({"prompt": prompt, "ideal": ["nope", answer.upper() + "."]})
        elif i < 3:
            rows.append({"prompt": prompt, "ideal": answer.upper() + "."})
        else:
            rows.append({"prompt": prompt, "answer": "certainly not " + answer})
    em = load_eval_set(write_jsonl(tmp_path / "em.jsonl", rows))
    assert em.kind == "exact_match" and em.examples[1].answers == (
        "nope",
        unbatched[1].upper() + ".",
    )
    result = evaluate(
        model, tokenizer, em, batch_size=2, max_new_tokens=4, chat_template=False, progress=False
    )
    assert result == {"exact_match": 3 / 5, "n": 5}


# ------------------------------------------------------------------------------------------------
# peft routing
# ------------------------------------------------------------------------------------------------


def test_adapter_per_example_routes_and_restores(tokenizer: Any, mc_set: EvalSet) -> None:
    _, peft_model = build_models(len(tokenizer))
    peft_model.set_adapter("c1")
    peft_model.set_adapter("c0")  # active "c0": only c0's LoRA weights trainable
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    assert any(flags[n] for n in flags if ".c0." in n) and not any(
        flags[n] for n in flags if ".c1." in n
    )
    per_adapter = {}
    for name in ("c0", "c1"):
        peft_model.set_adapter(name)
        per_adapter[name] = score_choices(peft_model, tokenizer, mc_set.examples)
    assert per_adapter["c0"][0][0] != per_adapter["c1"][0][0]  # the adapters really differ
    peft_model.set_adapter("c0")
    for p, (n, _) in zip(peft_model.parameters(), peft_model.named_parameters(), strict=True):
        p.requires_grad_(flags[n])

    routes = ["c1" if i % 2 else "c0" for i in range(len(mc_set))]
    expected_hits = []
    for i, (ex, adapter) in enumerate(zip(mc_set.examples, routes, strict=True)):
        pred, pred_norm = choice_predictions(*per_adapter[adapter][i])
        expected_hits.append((pred == ex.gold, pred_norm == ex.gold))
    result = evaluate(
        peft_model, tokenizer, mc_set, adapter_per_example=routes, batch_size=4, progress=False
    )
    n = len(mc_set)
    assert result == {
        "acc": sum(h[0] for h in expected_hits) / n,
        "acc_norm": sum(h[1] for h in expected_hits) / n,
        "n": n,
    }
    assert peft_model.active_adapter == "c0"
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags


def test_evaluate_errors(tiny_llama: Any, tokenizer: Any, mc_set: EvalSet) -> None:
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate(tiny_llama, tokenizer, mc_set, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got -1"):
        evaluate(tiny_llama, tokenizer, mc_set, max_new_tokens=-1)
    with pytest.raises(ValueError, match="eval set 'empty' has no examples"):
        evaluate(tiny_llama, tokenizer, EvalSet("empty", "exact_match", [], "x"))
    with pytest.raises(ValueError, match="has 2 entries but the eval set has 7 examples"):
        evaluate(tiny_llama, tokenizer, mc_set, adapter_per_example=["a", "b"])
    with pytest.raises(ValueError, match="not a string"):
        evaluate(tiny_llama, tokenizer, mc_set, adapter_per_example="a" * 7)
    with pytest.raises(ValueError, match="needs a peft model .* got LlamaForCausalLM"):
        evaluate(tiny_llama, tokenizer, mc_set, adapter_per_example=["a"] * 7)
    _, peft_model = build_models(len(tokenizer))
    with pytest.raises(
        ValueError, match=r"unknown adapters \['zz'\]; the model has \['c0', 'c1'\]"
    ):
        evaluate(peft_model, tokenizer, mc_set, adapter_per_example=["zz"] + ["c0"] * 6)
    with pytest.raises(ValueError, match="example 0 \\(task 't'\\) has no choices to score"):
        score_choices(tiny_llama, tokenizer, [EvalExample("q", ("a",), None, "t")])
    long_choice = EvalExample("q", ("x " * 20,), ("x " * 20, "y"), "t")
    with pytest.raises(ValueError, match="choice 0 has \\d+ tokens, more than max_length=8"):
        score_choices(tiny_llama, tokenizer, [long_choice], max_length=8)
    with pytest.raises(ValueError, match="kind must be one of"):
        EvalSet("s", "generation", [], "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="example 0 has no choices or its answers\\[0\\]"):
        EvalSet("s", "multiple_choice", [EvalExample("q", ("c",), ("a", "b"), "t")], "x")
    with pytest.raises(ValueError, match="example of task 't' has no choices"):
        _ = EvalExample("q", ("a",), None, "t").gold


# ------------------------------------------------------------------------------------------------
# Loading: local files
# ------------------------------------------------------------------------------------------------


def test_load_local_multiple_choice_and_exact_match(tmp_path: Path, mc_set: EvalSet) -> None:
    assert mc_set.kind == "multiple_choice" and mc_set.name == "mc" and len(mc_set) == 7
    assert mc_set.examples[1].answers == ("B",) and mc_set.examples[1].gold == 1
    assert mc_set.examples[1].prompt[0] == {"role": "system", "content": "Answer with a letter."}
    assert mc_set.examples[3].prompt == "Capital of France?"  # "input" alias
    assert [ex.task for ex in mc_set.examples][3:5] == ["mc", "facts"]
    rows = [
        {"prompt": "a", "ideal": "x"},
        {"input": "b", "answer": ["y", "Y!", "y"]},
        {"prompt": "c", "ideal": 42},
    ]
    em = load_eval_set(write_jsonl(tmp_path / "em.jsonl", rows), name="short")
    assert (em.name, em.kind, em.source) == ("short", "exact_match", str(tmp_path / "em.jsonl"))
    assert [ex.answers for ex in em.examples] == [("x",), ("y", "Y!"), ("42",)]
    assert all(ex.choices is None for ex in em.examples)
    # kind conversions
    as_em = load_eval_set(tmp_path / "mc.jsonl", kind="exact_match")
    assert as_em.kind == "exact_match" and as_em.examples[1].answers == ("B",)
    labels = write_jsonl(
        tmp_path / "labels.jsonl", [{"prompt": str(i), "ideal": "AB"[i % 2]} for i in range(6)]
    )
    forced = load_eval_set(labels, kind="multiple_choice")
    assert forced.kind == "multiple_choice" and forced.examples[1].choices == ("A", "B")
    assert load_eval_set(labels).kind == "exact_match"  # auto keeps a local file's form


def test_options_is_a_synonym_of_choices(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Is red a color?", "options": ["yes", "no"], "answer": 0},
        {"prompt": "Is a table a color?", "options": ["yes", "no"], "answer": "no"},
    ]
    path = write_jsonl(tmp_path / "bigbench.jsonl", rows)
    loaded = load_eval_set(path)
    assert loaded.kind == "multiple_choice"
    assert [ex.choices for ex in loaded.examples] == [("yes", "no"), ("yes", "no")]
    assert [ex.gold for ex in loaded.examples] == [0, 1]


def test_integer_answer_without_choices_is_refused(tmp_path: Path) -> None:
    # Before: read as exact match with the gold answer "1" -- silently wrong.
    path = write_jsonl(
        tmp_path / "opts.jsonl", [{"prompt": "Pick one", "option_list": ["a", "b"], "answer": 1}]
    )
    with pytest.raises(
        EvalSetError,
        match=r"opts\.jsonl:1: 'answer' is the integer 1, which reads as a choice index, but the "
        r"line has no choice list \(fields \['choices', 'options'\]\)",
    ):
        load_eval_set(path)


def test_load_subsample_is_seeded(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "big.jsonl", [{"prompt": f"q{i}", "ideal": str(i)} for i in range(50)]
    )
    first = load_eval_set(path, max_items=10, seed=3)
    again = load_eval_set(path, max_items=10, seed=3)
    other = load_eval_set(path, max_items=10, seed=4)
    ids = [int(ex.answers[0]) for ex in first.examples]
    assert ids == [int(ex.answers[0]) for ex in again.examples]
    assert ids != [int(ex.answers[0]) for ex in other.examples]
    assert ids == sorted(ids) and len(set(ids)) == 10
    assert len(load_eval_set(path, max_items=500)) == 50


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "a", "ideal": "x"}', "{not json"],
            r"bad\.jsonl:2: not valid JSON \(Expecting .* at column 2\)",
        ),
        (['["a", "b"]'], r"bad\.jsonl:1: expected a JSON object, got list"),
        (['{"question": "a", "ideal": "x"}'], r":1: missing field 'prompt' \(or 'input'\)"),
        (
            ['{"prompt": "a", "ideal": "x"}', '{"prompt": "b"}'],
            r":2: missing field 'ideal' \(or 'answer'\)",
        ),
        (['{"prompt": "  ", "ideal": "x"}'], r":1: field 'prompt' is an empty string"),
        (['{"prompt": 3, "ideal": "x"}'], r":1: field 'prompt' must be a non-empty string or"),
        (['{"input": [{"role": "user"}], "ideal": "x"}'], r":1: field 'input' message 0 must be"),
        (['{"prompt": "a", "ideal": []}'], r":1: field 'ideal' must be a string, a number or"),
        (['{"prompt": "a", "answer": {"x": 1}}'], r":1: field 'answer' must be a string, a number"),
        (
            ['{"prompt": "a", "choices": ["x"], "answer": 0}'],
            r":1: field 'choices' must be a list of at least 2",
        ),
        (
            ['{"prompt": "a", "choices": ["x", "x"], "answer": 0}'],
            r":1: field 'choices' has duplicate options",
        ),
        (
            ['{"prompt": "a", "options": ["x"], "answer": 0}'],
            r":1: field 'options' must be a list of at least 2",
        ),
        (
            ['{"prompt": "a", "choices": ["x", "y"]}'],
            r":1: missing field 'answer': the gold choice",
        ),
        (
            ['{"prompt": "a", "choices": ["x", "y"], "answer": 2}'],
            r":1: answer index 2 is out of range for 2 choices \(allowed 0\.\.1\)",
        ),
        (
            ['{"prompt": "a", "choices": ["x", "y"], "answer": "z"}'],
            r":1: answer 'z' is not among choices \['x', 'y'\]",
        ),
        (
            ['{"prompt": "a", "choices": ["x", "y"], "answer": true}'],
            r":1: field 'answer' must be a choice index or a choice text",
        ),
        (
            [
                '{"prompt": "a", "choices": ["x", "y"], "answer": 0}',
                '{"prompt": "b", "ideal": "x"}',
            ],
            r":2: the file mixes multiple-choice lines",
        ),
        (["", "   "], r"eval set .*bad\.jsonl has no examples"),
    ],
)
def test_load_errors_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=message):
        load_eval_set(path)


def test_load_errors_files_and_arguments(tmp_path: Path) -> None:
    with pytest.raises(EvalSetError, match="eval set file not found: .*missing.jsonl"):
        load_eval_set(tmp_path / "missing.jsonl")
    with pytest.raises(EvalSetError, match="eval set path is not a file: .* \\(expected a JSONL"):
        load_eval_set(tmp_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "caf\xe9", "ideal": "x"}\n')
    with pytest.raises(EvalSetError, match="latin.jsonl: not UTF-8 text"):
        load_eval_set(latin)
    good = write_jsonl(
        tmp_path / "good.jsonl", [{"prompt": f"{i}", "ideal": f"{i}"} for i in range(12)]
    )
    with pytest.raises(EvalSetError, match="cannot score as multiple choice: 12 distinct answers"):
        load_eval_set(good, kind="multiple_choice")
    with pytest.raises(ValueError, match="kind must be 'auto', 'multiple_choice' or 'exact_match'"):
        load_eval_set(good, kind="mc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_items must be a positive integer or None, got 0"):
        load_eval_set(good, max_items=0)
    with pytest.raises(ValueError, match="max_choices must be an integer >= 2, got 1"):
        load_eval_set(good, max_choices=1)


# ------------------------------------------------------------------------------------------------
# Loading: the evals registry
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import tclora.assets

    root = tmp_path / "registry"
    (root / "yesno" / "sub").mkdir(parents=True)
    msgs = [{"role": "system", "content": "Answer yes or no."}]
    write_jsonl(
        root / "yesno" / "samples.jsonl",
        [
            {"input": msgs + [{"role": "user", "content": f"q{i}"}], "ideal": ["yes", "no"][i % 2]}
            for i in range(6)
        ],
    )
    write_jsonl(
        root / "yesno" / "sub" / "more.jsonl", [{"input": msgs, "ideal": ["Yes", "yes"]}]
    )  # list ideal: label is its first item
    write_jsonl(root / "yesno" / "few_shot.jsonl", [{"sample": msgs}])  # not an eval file: skipped
    (root / "broken").mkdir()
    write_jsonl(root / "broken" / "samples.jsonl", [{"input": msgs, "ideal": "a"}, {"input": msgs}])
    (root / "graded").mkdir()
    write_jsonl(root / "graded" / "samples.jsonl", [{"input": msgs, "completion": "x"}])
    monkeypatch.setattr(tclora.assets, "corpus_dir", lambda: root)
    return root


def test_registry_loader_on_fake_registry(fake_registry: Path) -> None:
    auto = load_eval_set("registry:yesno")
    assert (auto.name, auto.kind, auto.source, len(auto)) == (
        "yesno",
        "multiple_choice",
        "registry:yesno",
        7,
    )
    assert auto.examples[0].choices == ("Yes", "no", "yes")
    assert auto.examples[6].answers == ("Yes", "yes") and auto.examples[6].gold == 0
    assert auto.examples[0].task == "yesno"
    em = load_eval_set("registry:yesno", kind="exact_match", name="yn")
    assert em.kind == "exact_match" and em.name == "yn" and em.examples[0].choices is None
    assert load_eval_set("registry:yesno", max_choices=2).kind == "exact_match"
    with pytest.raises(EvalSetError, match="registry:yesno: cannot score as multiple choice: 3"):
        load_eval_set("registry:yesno", kind="multiple_choice", max_choices=2)
    with pytest.raises(EvalSetError, match=r"broken.samples\.jsonl:2: missing field 'ideal'"):
        load_eval_set("registry:broken")
    with pytest.raises(EvalSetError, match="registry task 'graded' has no evaluation file"):
        load_eval_set("registry:graded")
    with pytest.raises(
        EvalSetError,
        match=r"^registry:yesn0: no evals-registry task 'yesn0' under .*; did you mean \['yesno'\]\?$",
    ):
        load_eval_set("registry:yesn0")
    with pytest.raises(
        EvalSetError, match=r"^registry:\.\./x: no evals-registry task '\.\./x' under"
    ):
        load_eval_set("registry:../x")


def test_real_registry_tasks() -> None:
    sarcasm = load_eval_set("registry:sarcasm", max_items=20, seed=1)
    assert sarcasm.kind == "multiple_choice" and len(sarcasm) == 20
    assert all(ex.choices == ("0", "1") for ex in sarcasm.examples)
    assert isinstance(sarcasm.examples[0].prompt, list)
    diagrams = load_eval_set("registry:diagrammatic_logic", max_items=5)  # list-valued ideals
    assert diagrams.kind == "multiple_choice"
    assert diagrams.examples[0].choices == ("A", "B", "C", "D")
    counting = load_eval_set("registry:logical_counting", max_items=5)
    assert counting.kind == "exact_match" and counting.examples[0].choices is None
    assert all(ex.answers[0].strip() for ex in counting.examples)


# ------------------------------------------------------------------------------------------------
# Distributed
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_evaluation_equals_single_process(
    tmp_path: Path, tokenizer: Any, smollm2_dir: Path, mc_set: EvalSet
) -> None:
    em_rows = [{"prompt": p, "ideal": "x"} for p in EM_PROMPTS]
    model, peft_model = build_models(len(tokenizer))
    # make two exact-match answers right, on different ranks (indices 0 and 3)
    answers = generate_answers(model, tokenizer, EM_PROMPTS, max_new_tokens=4, chat_template=False)
    em_rows[0]["ideal"], em_rows[3]["ideal"] = answers[0], answers[3]
    em_path = write_jsonl(tmp_path / "em.jsonl", em_rows)
    em_set = load_eval_set(em_path)
    routes = ["c0" if i % 3 else "c1" for i in range(len(mc_set))]
    kw: dict[str, Any] = dict(batch_size=3, max_new_tokens=4, progress=False)
    single = {
        "mc": evaluate(model, tokenizer, mc_set, **kw),
        "em": evaluate(model, tokenizer, em_set, chat_template=False, **kw),
        "routed": evaluate(peft_model, tokenizer, mc_set, adapter_per_example=routes, **kw),
    }
    assert single["em"] == {"exact_match": 2 / 5, "n": 5}
    items: dict[str, dict[str, list[int]]] = {"em": {}, "routed": {}}
    evaluate(model, tokenizer, em_set, chat_template=False, items=items["em"], **kw)
    routed = evaluate(
        peft_model, tokenizer, mc_set, adapter_per_example=routes, items=items["routed"], **kw
    )
    assert items["em"] == {"exact_match": [1, 0, 0, 1, 0]}  # per example, in set order
    assert sorted(items["routed"]) == ["acc", "acc_norm"]
    assert sum(items["routed"]["acc"]) == round(routed["acc"] * len(mc_set))

    out = tmp_path / "out"
    out.mkdir()
    script = Path(__file__).with_name("ddp_eval_script.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(smollm2_dir), mc_set.source, str(em_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert {k: rank[k] for k in single} == single  # exactly equal, on every rank
        assert rank["items"] == items  # every example's correctness, gathered over the ranks
    # rank 0 scored examples 0,2,4,6 and rank 1 examples 1,3,5 (mc; em: 3 and 2; routed groups)
    assert ranks[0]["scored"][:2] == [4, 3] and ranks[1]["scored"][:2] == [3, 2]
    assert sum(ranks[0]["scored"][2:]) == 4 and sum(ranks[1]["scored"][2:]) == 3


@pytest.mark.slow
def test_real_smollm2_prefers_the_right_capital(smollm2_dir: Path, tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    example = EvalExample(
        "What is the capital of France?", ("Paris",), ("London", "Paris", "Berlin"), "geo"
    )
    one = score_choices(model, tokenizer, [example], batch_size=1)
    ((logliks, _),) = score_choices(model, tokenizer, [example], batch_size=8)
    torch.testing.assert_close(torch.tensor(logliks), torch.tensor(one[0][0]), rtol=0, atol=1e-4)
    assert choice_predictions(logliks, [len(c) for c in example.choices]) == (1, 1)
    context = render_prompt(tokenizer, example.prompt)
    expected = hand_loglik(model, tokenizer, context, "Paris", chat=True)
    torch.testing.assert_close(torch.tensor(logliks[1]), torch.tensor(expected), rtol=0, atol=1e-3)


def test_fold_adapter_scores_alike_and_restores_the_base_weights_bit_exactly(
    tokenizer: Any, mc_set: EvalSet
) -> None:
    _, peft_model = build_models(len(tokenizer))
    peft_model.set_adapter("c1")
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    kw: dict[str, Any] = dict(batch_size=3, progress=False)
    plain_items: dict[str, list[int]] = {}
    folded_items: dict[str, list[int]] = {}
    plain = evaluate(peft_model, tokenizer, mc_set, items=plain_items, **kw)
    folded = evaluate(peft_model, tokenizer, mc_set, items=folded_items, fold_adapter=True, **kw)
    assert folded == plain and folded_items == plain_items
    for name, p in peft_model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)  # bit-exact
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())
    # the log-likelihoods themselves differ by float rounding only
    from tclora.evaluation.distributed import _folded

    with torch.no_grad():
        ids = torch.tensor([[1, 5, 9, 4, 7]])
        lora = peft_model(input_ids=ids).logits
        with _folded(peft_model, True) as did:
            assert did
            torch.testing.assert_close(peft_model(input_ids=ids).logits, lora, rtol=1e-5, atol=1e-5)
        # the base model is scored with adapters disabled: nothing to fold
        with peft_model.disable_adapter(), _folded(peft_model, True) as did:
            assert not did
        peft_model.merge_adapter()
        with pytest.raises(ValueError, match=r"fold_adapter=True on a model whose adapter is "):
            evaluate(peft_model, tokenizer, mc_set, fold_adapter=True, **kw)
        peft_model.unmerge_adapter()


def test_shared_prefix_runs_once_and_scores_alike(tiny_llama: Any, tokenizer: Any) -> None:
    """Registry-style items: one instruction, then the item. The common prefix (chat template +
    instruction) runs once; the log-likelihoods equal the unshared ones up to float rounding."""
    import tclora.evaluation.scoring as scoring

    instruction = "Decide whether the word names a food. Answer Yes or No. Word: "
    words = ["apple", "granite", "bread", "cloud", "rice", "violin", "cheese"]
    examples = [
        EvalExample(instruction + w, ("Yes",), ("Yes", "No", "Maybe not"), "food") for w in words
    ]
    seen: list[int] = []
    original = scoring._score_rows

    def recording(*args: Any, **kwargs: Any) -> Any:
        prefix = args[5] if len(args) > 5 else kwargs.get("prefix")
        seen.append(0 if prefix is None else prefix[1])
        return original(*args, **kwargs)

    scoring._score_rows = recording  # type: ignore[assignment]
    try:
        shared = score_choices(tiny_llama, tokenizer, examples, batch_size=3)
        plain = score_choices(tiny_llama, tokenizer, examples, batch_size=3, share_prefix=False)
    finally:
        scoring._score_rows = original  # type: ignore[assignment]
    n = len(seen) // 2
    assert min(seen[:n]) > 15 and seen[n:] == [0] * n  # the prefix was shared, then not
    assert_same_scores(shared, plain, atol=1e-5)
    # two examples: their whole common context is shared, all but what predicts the choices
    two = score_choices(tiny_llama, tokenizer, [examples[0], examples[0]])
    torch.testing.assert_close(
        torch.tensor(two[1][0]), torch.tensor(plain[0][0]), rtol=0, atol=1e-5
    )


def test_generation_from_a_shared_prefix_gives_the_same_answers(tokenizer: Any) -> None:
    """Prompts laid out as [shared prefix | padding | rest], started from the prefix's cache:
    greedy answers equal those of plain left-padded batches (prompts of different lengths)."""
    import tclora.evaluation.scoring as scoring

    instruction = "Rewrite the date in words, then stop. The date is "
    prompts = [instruction + d for d in ("1990-08-29", "3 May", "2001", "12/12/1912 at noon")]
    calls: list[int] = []
    original = scoring._prefix_cache

    def recording(model: Any, prefix: Any, device: Any) -> Any:
        calls.append(len(prefix))
        return original(model, prefix, device)

    scoring._prefix_cache = recording  # type: ignore[assignment]
    try:
        model, _ = build_models(len(tokenizer))  # untied: varied greedy outputs
        kw: dict[str, Any] = dict(batch_size=3, max_new_tokens=6, chat_template=False)
        with torch.no_grad():
            shared = generate_answers(model, tokenizer, prompts, **kw)
            plain = generate_answers(model, tokenizer, prompts, share_prefix=False, **kw)
    finally:
        scoring._prefix_cache = original  # type: ignore[assignment]
    assert len(calls) == 1 and calls[0] >= 10  # the prefix ran once, for every batch
    assert shared == plain and any(shared)
