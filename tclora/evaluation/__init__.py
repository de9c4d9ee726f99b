"""Evaluation of causal LMs (and multi-adapter peft models) on multiple-choice and short-answer sets.

Two scorers of tclora's own, both batched and shardable over ``torch.distributed`` ranks, and
lm-evaluation-harness as a third evaluator and their referee:

* **Multiple choice by log-likelihood**, as lm-evaluation-harness scores it
  (``lm_eval/api/task.py``, ``ConfigurableTask.process_results`` for ``output_type:
  multiple_choice``)::

      completion_len = np.array([float(len(i)) for i in choices])
      pred = np.argmax(lls)
      pred_norm = np.argmax(lls / completion_len)

  ``acc`` is the argmax of the summed log-likelihood of each choice's continuation tokens;
  ``acc_norm`` is the argmax of that sum divided by the choice's length in *characters*
  (``len(str)``, not tokens and not UTF-8 bytes -- the harness divides by ``len`` of the choice
  string; its byte counts are only used for perplexity metrics). Each continuation is scored the
  way the harness' ``HFLM._encode_pair`` / ``_loglikelihood_tokens`` do it: trailing whitespace
  of the context is moved to the front of the continuation, ``context + continuation`` is encoded
  whole and split at the length of the encoded context, the sequence is left-truncated to
  ``max_length + 1`` tokens, and the log-probabilities of the continuation tokens are summed.

  The continuation text depends on the prompt format, again as in the harness: with a chat
  template (``apply_chat_template(..., add_generation_prompt=True)``) the assistant turn starts
  right after the generation prompt, so the continuation is the bare choice text (the harness sets
  ``target_delimiter = ""`` under ``apply_chat_template``); for plain-text prompts it is
  ``" " + choice`` (the harness' default ``target_delimiter``). Note that SmolLM2's generation
  prompt ends in ``"\\n"``, which the whitespace rule moves into the continuation: every choice then
  also pays ``log p("\\n" | "...<|im_start|>assistant")``, a constant shared by all choices.

* **Short-answer exact match**: greedy generation (``do_sample=False``) of at most
  ``max_new_tokens`` with left padding; only the new tokens are decoded, the first non-empty line
  is kept, and it is compared to every acceptable answer after :func:`normalize_answer`
  (whitespace collapsed, casefolded, trailing punctuation removed).

* **lm-evaluation-harness itself** (:mod:`tclora.evaluation.harness`; the optional extra
  ``pip install 'tclora[harness]'``, lm-eval 0.4.13): ``lm_eval:<task>`` and
  ``lm_eval:<path>.yaml`` sets are scored by ``lm_eval.simple_evaluate`` on the in-memory model,
  sharded over DDP ranks like the scorers above, and tclora's sets can be written as lm-eval
  tasks (:func:`write_harness_task`). lm-eval is also the **referee** of the multiple-choice
  scorer: ``tests/test_harness.py`` scores the same items with both on a tiny model and on
  SmolLM2 (two evals-registry tasks, plain and chat-templated) and requires every choice's
  log-likelihood within 1e-4 and identical ``acc`` / ``acc_norm`` per item. Convention by
  convention:

  - *target delimiter*: the same; ``" " + choice`` on plain prompts, the bare choice under a
    chat template (lm-eval's rule for ``apply_chat_template`` without a ``gen_prefix``);
  - *whitespace*: the same; trailing whitespace of the context moves into the continuation;
  - *context*: the same; lm-eval's ``apply_chat_template`` calls the tokenizer's with
    ``add_generation_prompt=True`` on one optional system message (the task's
    ``description``) and one user message, and a plain context is the prompt as it is. A
    system + user prompt written as plain text is joined by ``"\n"`` here, while lm-eval
    concatenates description and text: :func:`write_harness_task` writes the joined text, so the
    two agree on tclora's sets;
  - *length normalisation*: the same; ``acc_norm`` divides by ``len(choice)`` in characters
    (lm-eval's byte-normalised ``acc_bytes`` is not reported by either);
  - *truncation*: the same rule, left truncation to ``max_length + 1`` tokens; lm-eval's default
    ``max_length`` is the model's context size, so the harness path passes the study's;
  - *padding*: lm-eval right-pads without an attention mask, tclora with one; the logits agree
    to float rounding (at most 2e-6 seen);
  - *special tokens under a chat template*: **they differ** for a tokenizer that adds BOS itself
    and whose chat template does not begin with the BOS text: lm-eval encodes templated text
    with the tokenizer's special tokens (unless it begins with the BOS text), tclora (like its
    training) never, so lm-eval's context has one BOS more. Made an option of the harness path:
    ``conventions="tclora"`` (the default) passes ``add_bos_token=False`` to lm-eval under a chat
    template, ``conventions="lm_eval"`` keeps lm-eval's rule. Plain prompts get the
    tokenizer's default special tokens in both;
  - *log-softmax precision*: lm-eval's default is the model's dtype (bf16 on a bf16 model),
    tclora's float32; ``conventions="tclora"`` passes ``softmax_dtype=float32``;
  - *empty context*: unreachable (tclora's sets refuse empty prompts); lm-eval would condition
    on the BOS token unless the continuation begins with it.

Accuracies are accumulated in a torchmetrics :class:`~torchmetrics.Metric` with integer count
states, so when examples are sharded over ranks (rank ``i`` takes examples ``i::world_size``) the
synchronised result equals the single-process result exactly.

Evaluation sets load from a local JSONL file or from the packaged evals registry
(``"registry:<task>"``); see :func:`load_eval_set` (and :func:`load_any_eval_set`, which also
takes ``"lm_eval:..."``).

The package has one module per job; every public name is re-exported here:

* :mod:`tclora.evaluation.sets` -- :class:`EvalExample`, :class:`EvalSet`, :func:`load_eval_set`;
* :mod:`tclora.evaluation.scoring` -- exact-match normalisation and the two scorers,
  :func:`score_choices` and :func:`generate_answers`;
* :mod:`tclora.evaluation.distributed` -- :class:`AccuracyCounter`, adapter routing and
  :func:`evaluate`;
* :mod:`tclora.evaluation.harness` -- :class:`HarnessTask`, :func:`load_harness_task`,
  :func:`harness_evaluate` / :func:`run_harness` and :func:`write_harness_task` (lm-eval is
  imported only when one of them is used).
"""

from tclora.data.samples import Prompt, render_prompt
from tclora.evaluation.distributed import AccuracyCounter, evaluate
from tclora.evaluation.harness import (
    HARNESS_PREFIX,
    LM_EVAL_VERSION,
    HarnessError,
    HarnessRun,
    HarnessTask,
    as_harness_task,
    harness_evaluate,
    harness_installed,
    load_any_eval_set,
    load_harness_task,
    require_harness,
    run_harness,
    write_harness_task,
)
from tclora.evaluation.scoring import (
    answers_beyond_budget,
    choice_predictions,
    encode_pair,
    generate_answers,
    is_exact_match,
    normalize_answer,
    score_choices,
)
from tclora.evaluation.sets import (
    REGISTRY_PREFIX,
    EvalExample,
    EvalSet,
    EvalSetError,
    load_eval_set,
)

__all__ = [
    "HARNESS_PREFIX",
    "LM_EVAL_VERSION",
    "REGISTRY_PREFIX",
    "AccuracyCounter",
    "EvalExample",
    "EvalSet",
    "EvalSetError",
    "HarnessError",
    "HarnessRun",
    "HarnessTask",
    "Prompt",
    "answers_beyond_budget",
    "as_harness_task",
    "choice_predictions",
    "encode_pair",
    "evaluate",
    "generate_answers",
    "harness_evaluate",
    "harness_installed",
    "is_exact_match",
    "load_any_eval_set",
    "load_eval_set",
    "load_harness_task",
    "normalize_answer",
    "render_prompt",
    "require_harness",
    "run_harness",
    "score_choices",
    "write_harness_task",
]
