"""Sources -> samples: read multi-task training data from files, folders, the evals registry or
Hugging Face ``datasets`` into one flat list of :class:`Sample` records.

Nothing here embeds, tokenises or clusters; the functions are pure and cheap, so every bad input is
reported before any expensive work starts.
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

__all__ = [
    "SOURCE_KINDS",
    "DataSourceError",
    "Message",
    "Prompt",
    "Sample",
    "SourceSpec",
    "check_source",
    "content_hash",
    "load_source",
    "load_sources",
    "parse_source",
    "prompt_text",
    "render_prompt",
    "split_train_val",
]
