"""Evaluation of causal LMs (and multi-adapter peft models) on multiple-choice and short-answer sets.

Two scorers, both batched and shardable over ``torch.distributed`` ranks:

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

Accuracies are accumulated in a torchmetrics :class:`~torchmetrics.Metric` with integer count
states, so when examples are sharded over ranks (rank ``i`` takes examples ``i::world_size``) the
synchronised result equals the single-process result exactly.

Evaluation sets load from a local JSONL file or from the packaged evals registry
(``"registry:<task>"``); see :func:`load_eval_set`.

The package has one module per job; every public name is re-exported here:

* :mod:`tclora.evaluation.sets` -- :class:`EvalExample`, :class:`EvalSet`, :func:`load_eval_set`;
* :mod:`tclora.evaluation.scoring` -- exact-match normalisation and the two scorers,
  :func:`score_choices` and :func:`generate_answers`;
* :mod:`tclora.evaluation.distributed` -- :class:`AccuracyCounter`, adapter routing and
  :func:`evaluate`.
"""

from tclora.data.samples import Prompt, render_prompt
from tclora.evaluation.distributed import AccuracyCounter, evaluate
from tclora.evaluation.scoring import (
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
    "REGISTRY_PREFIX",
    "AccuracyCounter",
    "EvalExample",
    "EvalSet",
    "EvalSetError",
    "Prompt",
    "choice_predictions",
    "encode_pair",
    "evaluate",
    "generate_answers",
    "is_exact_match",
    "load_eval_set",
    "normalize_answer",
    "render_prompt",
    "score_choices",
]
