"""Readers: sources -> samples (files, folders, evals registry, Hugging Face), caps and split."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tclora.data import (
    DataSourceError,
    Sample,
    check_source,
    content_hash,
    load_source,
    load_sources,
    parse_source,
    prompt_text,
    split_train_val,
)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


RECORDS = [
    {"prompt": "What is 1 + 1?", "response": "2", "task": "math"},
    {"prompt": "Say hi in French.", "response": "salut", "task": "french"},
    {"prompt": [{"role": "user", "content": "Name a colour."}], "response": ["red", "blue"]},
]


def test_jsonl_fields_tasks_and_messages(tmp_path: Path) -> None:
    samples = load_source(str(_write_jsonl(tmp_path / "mixed.jsonl", RECORDS)))
    assert [s.task for s in samples] == ["math", "french", "mixed"]  # file stem by default
    assert samples[2].prompt == [{"role": "user", "content": "Name a colour."}]
    assert samples[2].response == "red"  # a list response takes its first element
    assert prompt_text(samples[2].prompt) == "Name a colour."
    assert all(s.source.endswith("mixed.jsonl") for s in samples)


def test_json_csv_and_folder(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.json").write_text(json.dumps({"data": RECORDS[:2]}))
    _write_jsonl(tmp_path / "d" / "sub" / "b.jsonl", RECORDS[2:])
    samples = load_source(str(tmp_path / "d"))
    assert [(s.response, s.task) for s in samples] == [
        ("2", "math"),
        ("salut", "french"),
        ("red", "b"),
    ]
    with open(tmp_path / "c.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["q", "a"])
        writer.writeheader()
        writer.writerow({"q": "Capital of France?", "a": "Paris"})
    samples = load_source(
        {"path": str(tmp_path / "c.csv"), "prompt_field": "q", "response_field": "a", "task": "geo"}
    )
    assert [(s.prompt, s.response, s.task) for s in samples] == [
        ("Capital of France?", "Paris", "geo")
    ]
    with pytest.raises(DataSourceError, match=r"a\.json\[0\]: missing field\(s\) \['q', 'a'\]"):
        load_source({"path": str(tmp_path / "d"), "prompt_field": "q", "response_field": "a"})
    (tmp_path / "bad.json").write_text(json.dumps({"x": 1}))
    with pytest.raises(DataSourceError, match=r"expected a JSON list of records"):
        load_source(str(tmp_path / "bad.json"))


def test_task_field_mapping_and_defaults(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "t.jsonl", [{"p": "x", "r": "y", "kind": "k1"}])
    samples = load_sources([str(path)], prompt_field="p", response_field="r", task_field="kind")
    assert samples == [Sample("x", "y", "k1", str(path))]
    with pytest.raises(DataSourceError, match=r"missing field\(s\) \['nope'\]"):
        load_source(
            {"path": str(path), "prompt_field": "p", "response_field": "r", "task_field": "nope"}
        )


def test_max_samples_is_a_seeded_subset_in_order(tmp_path: Path) -> None:
    records = [{"prompt": f"q{i}", "response": str(i)} for i in range(50)]
    path = str(_write_jsonl(tmp_path / "many.jsonl", records))
    a = load_source({"path": path, "max_samples": 10}, seed=1)
    b = load_source({"path": path, "max_samples": 10}, seed=1)
    c = load_source({"path": path, "max_samples": 10}, seed=2)
    assert [s.prompt for s in a] == [s.prompt for s in b] != [s.prompt for s in c]
    numbers = [int(s.response) for s in a]
    assert len(numbers) == 10 and numbers == sorted(numbers)


def test_registry_task_reads_chat_messages() -> None:
    samples = load_source({"registry": "2d_movement", "max_samples": 5})
    assert len(samples) == 5
    assert all(isinstance(s.prompt, list) and s.prompt[0]["role"] for s in samples)
    assert all(s.task == "2d_movement" and s.source == "registry:2d_movement" for s in samples)
    assert all(isinstance(s.response, str) and s.response for s in samples)


def test_registry_errors() -> None:
    with pytest.raises(
        DataSourceError, match=r"no evals-registry task '2d_movment'.*did you mean \['2d_movement'"
    ):
        load_source("registry:2d_movment")
    with pytest.raises(DataSourceError, match=r"nothing after 'registry:'"):
        parse_source("registry:")


def test_check_source_rejects_unknown_registry_tasks(tmp_path: Path, monkeypatch) -> None:
    check_source(parse_source("registry:2d_movement"))  # exists: nothing is read
    with pytest.raises(
        DataSourceError,
        match=r"^source 'registry:2d_movment': no evals-registry task '2d_movment' under .*; "
        r"did you mean \['2d_movement', 'body_movement', '3d_globe_movement'\]\?$",
    ):
        check_source(parse_source("registry:2d_movment"))
    root = tmp_path / "corpus"
    for task in ("alpha", "beta"):
        (root / task).mkdir(parents=True)
    monkeypatch.setattr("tclora.assets.corpus_dir", lambda: root)
    with pytest.raises(
        DataSourceError,
        match=rf"^source 'registry:zzz': no evals-registry task 'zzz' under "
        rf"{re.escape(str(root))} \(2 tasks are available; "
        r"tclora\.assets\.list_corpus_tasks\(\) lists the MIT-licensed ones\)$",
    ):
        check_source(parse_source("registry:zzz"))
    check_source(parse_source("registry:alpha"))
    (root / "alpha" / "sub").mkdir()
    for outside in ("../corpus", "alpha/sub", ".hidden"):  # one folder name, inside the corpus
        with pytest.raises(
            DataSourceError, match=rf"no evals-registry task {re.escape(repr(outside))}"
        ):
            check_source(parse_source(f"registry:{outside}"))


def test_registry_skips_incomplete_lines_with_a_count(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "corpus"
    (root / "t" / "sub").mkdir(parents=True)
    msgs = [{"role": "user", "content": "hi"}]
    _write_jsonl(root / "t" / "a.jsonl", [{"input": msgs, "ideal": "yo"}, {"input": msgs}])
    _write_jsonl(root / "t" / "sub" / "b.jsonl", [{"input": msgs, "ideal": ["x", "y"]}])
    (root / "other").mkdir()
    _write_jsonl(root / "other" / "c.jsonl", [{"question": "q", "answer": "a"}])
    monkeypatch.setattr("tclora.assets.corpus_dir", lambda: root)
    with pytest.warns(UserWarning, match=r"skipped 1 record\(s\) without 'input'/'ideal'; kept 2"):
        samples = load_source("registry:t")
    assert [s.response for s in samples] == ["yo", "x"]
    with pytest.raises(
        DataSourceError, match=r"registry task yields no usable samples.*another schema"
    ):
        load_source("registry:other")


def test_bad_sources_have_clear_messages(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match=r"'missing\.jsonl': no such file or folder"):
        load_source("missing.jsonl")
    with pytest.raises(DataSourceError, match=r"unknown source type 's3'; allowed: a local file"):
        parse_source("s3://bucket/data.jsonl")
    with pytest.raises(
        DataSourceError, match=r"unknown source type; a source dict needs exactly one"
    ):
        parse_source({"prompt_field": "x"})
    with pytest.raises(DataSourceError, match=r"unknown source type int"):
        parse_source(3)  # type: ignore[arg-type]
    with pytest.raises(DataSourceError, match=r"unknown option\(s\) \['promt_field'\]"):
        parse_source({"path": "x", "promt_field": "p"})
    with pytest.raises(DataSourceError, match=r"max_samples=0 must be a positive integer"):
        parse_source({"path": "x", "max_samples": 0})
    # before: split / name were read for Hugging Face datasets only and ignored elsewhere
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    with pytest.raises(
        DataSourceError,
        match=r"split='validation' applies to Hugging Face datasets only \('hf:<name>'; split "
        r"also to a folder saved with `save_to_disk`\), and this path source would be read whole",
    ):
        parse_source({"path": str(tmp_path / "train.jsonl"), "split": "validation"})
    with pytest.raises(DataSourceError, match=r"split='test', name='cfg' applies to Hugging Face"):
        parse_source({"registry": "2d_movement", "split": "test", "name": "cfg"})
    assert parse_source({"hf": "org/data", "split": "test", "name": "cfg"}).split == "test"
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataSourceError, match=r"unknown file type '\.txt'"):
        load_source(str(tmp_path / "notes.txt"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataSourceError, match=r"empty data \(no samples\)"):
        load_source(str(tmp_path / "empty.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(DataSourceError, match=r"bad\.jsonl:2: not valid JSON \(.* at column 2\)"):
        load_source(str(tmp_path / "bad.jsonl"))
    (tmp_path / "latin.jsonl").write_bytes(b'{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataSourceError, match=r"latin\.jsonl: not UTF-8 text"):
        load_source(str(tmp_path / "latin.jsonl"))
    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": 5, "response": "b"}])
    with pytest.raises(DataSourceError, match=r"field 'prompt' must be a string or a list"):
        load_source(str(tmp_path / "p.jsonl"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataSourceError, match=r"the folder holds no data files"):
        load_source(str(tmp_path / "dir"))
    with pytest.raises(DataSourceError, match=r"expected a non-empty list of sources"):
        load_sources([])
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    try:  # pyarrow comes with the harness extra's `datasets`
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(DataSourceError, match=r"Parquet needs the optional package pyarrow"):
            load_source(str(tmp_path / "x.parquet"))
    else:  # a truncated file names itself instead of a raw pyarrow error
        with pytest.raises(DataSourceError, match=r"x\.parquet: not a readable Parquet file"):
            load_source(str(tmp_path / "x.parquet"))


def test_hugging_face_without_datasets_says_how_to_install(tmp_path: Path) -> None:
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataSourceError, match=r"pip install datasets"):
            load_source("hf:tatsu-lab/alpaca")
        saved = tmp_path / "saved"
        saved.mkdir()
        (saved / "dataset_dict.json").write_text("{}")
        with pytest.raises(DataSourceError, match=r"pip install datasets"):
            load_source(str(saved))
    else:  # pragma: no cover -- with datasets installed, offline loading must fail clearly
        with pytest.raises(DataSourceError, match=r"could not load the Hugging Face dataset"):
            load_source("hf:tclora-no-such-user/no-such-dataset")


def test_content_hash_and_split() -> None:
    a = [Sample("p", "r", "t"), Sample("q", "s", "t")]
    assert content_hash(a) == content_hash([Sample("p", "r", "t", "other source"), a[1]])
    assert content_hash(a) != content_hash(a[::-1])
    assert content_hash(a) != content_hash([Sample("p", "r", "u"), a[1]])
    train, val = split_train_val(10, 0.25, seed=3)
    assert len(val) == 3 and len(train) == 7
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), np.arange(10))
    t2, v2 = split_train_val(10, 0.25, seed=3)
    np.testing.assert_array_equal(v2, val)
    assert len(split_train_val(1, 0.5, 0)[0]) == 1  # never everything held out
    with pytest.raises(ValueError, match=r"val_fraction=1.0 must be in \[0, 1\)"):
        split_train_val(10, 1.0, 0)
