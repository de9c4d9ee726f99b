"""README's demo results are generated (benchmarks/demo_table.py), never edited by hand."""

from __future__ import annotations

import json

from benchmarks.demo_table import BEGIN, END, README, RECORD, main, readme_block, replace_block


def test_readme_demo_table_is_what_the_run_record_renders_to() -> None:
    """Before: the README's table was hand-edited and differed from the run's results.md."""
    assert main(["--check"]) == 0
    block = readme_block(json.loads(RECORD.read_text(encoding="utf-8")))
    readme = README.read_text(encoding="utf-8")
    assert block in readme
    assert "benchmarks/demo_table.py" in block and "(kept)" in block


def test_replace_block_keeps_the_rest() -> None:
    text = f"intro\n{BEGIN}\nold\n{END}\noutro\n"
    assert replace_block(text, f"{BEGIN}\nnew\n{END}") == f"intro\n{BEGIN}\nnew\n{END}\noutro\n"
