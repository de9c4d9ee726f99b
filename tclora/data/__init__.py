"""Sources -> samples: read multi-task training data from files, folders, the evals registry or
Hugging Face ``datasets`` into one flat list of :class:`Sample` records.

Nothing here embeds or clusters; reading is pure and cheap, so every bad input is reported before
any expensive work starts. :mod:`tclora.data.tokenized` turns samples into token ids and batches.
"""

from tclora.data.samples import (
    Message,
    Prompt,
    Sample,
    content_hash,
    prompt_text,
    render_prompt,
    split_train_val,
)
from tclora.data.sources import (
    SOURCE_KINDS,
    DataSourceError,
    SourceSpec,
    check_source,
    load_source,
    load_sources,
    parse_source,
)
from tclora.data.tokenized import (
    IGNORE_INDEX,
    TokenizedSamples,
    collate_batch,
    tokenize_sample,
    tokenizer_fingerprint,
)

__all__ = [
    "IGNORE_INDEX",
    "SOURCE_KINDS",
    "DataSourceError",
    "Message",
    "Prompt",
    "Sample",
    "SourceSpec",
    "TokenizedSamples",
    "check_source",
    "collate_batch",
    "content_hash",
    "load_source",
    "load_sources",
    "parse_source",
    "prompt_text",
    "render_prompt",
    "split_train_val",
    "tokenize_sample",
    "tokenizer_fingerprint",
]
