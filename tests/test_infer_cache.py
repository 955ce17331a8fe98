"""The per-process engine lookup every shard makes: the examples file is parsed once, and again only when it changes."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl
import pytest

from docroute.schemas.spec import JobSpec
from docroute.tasks.model import infer


def _spec(tmp_path: Path, examples: Path) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "cache-test",
            "source": {"url": str(tmp_path / "docs")},
            "task": {"classify": {"labels": [{"name": "a"}, {"name": "b"}], "examples_file": str(examples)}},
            "output": {"url": str(tmp_path / "out")},
        }
    )


def test_examples_are_parsed_once_per_file_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    examples = tmp_path / "examples.csv"
    pl.DataFrame({"text": ["one", "two"], "label": ["a", "b"]}).write_csv(examples)
    spec = _spec(tmp_path, examples)
    reads: list[str] = []
    load = infer.load_labeled_examples

    def counting(classify):  # type: ignore[no-untyped-def]
        reads.append(classify.examples_file)
        return load(classify)

    monkeypatch.setattr(infer, "load_labeled_examples", counting)
    infer.clear_engine_cache()
    first, digest = infer._examples_and_digest(spec)
    for _ in range(5):  # what every shard does: no new read while the file is unchanged
        assert infer._examples_and_digest(spec) == (first, digest)
    assert first == [("one", "a"), ("two", "b")] and len(reads) == 1
    first.append(("mutated", "a"))  # callers get a copy: the cache cannot be changed through it
    assert infer._examples_and_digest(spec)[0] == [("one", "a"), ("two", "b")]

    pl.DataFrame({"text": ["one", "two", "three"], "label": ["a", "b", "a"]}).write_csv(examples)
    stat = examples.stat()
    os.utime(examples, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a later mtime, whatever the clock
    edited, edited_digest = infer._examples_and_digest(spec)
    assert edited == [("one", "a"), ("two", "b"), ("three", "a")] and edited_digest != digest and len(reads) == 2
    assert len([key for key in infer._EXAMPLES if key[1] == str(examples)]) == 1  # the old version was dropped
    infer.clear_engine_cache()
