"""Examples files: labeled texts for classification, worked documents for extraction, and their clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from docroute.schemas.spec import ClassifySpec, ExtractExample, ExtractSpec, FieldSpec, LabelSpec
from docroute.tasks.ingest.examples import ExamplesFileError, load_extraction_examples, load_labeled_examples

FIELDS = [FieldSpec(name="total", type="decimal"), FieldSpec(name="vendor", type="str", required=False)]


def test_extraction_examples_from_jsonl_add_to_the_inline_ones(tmp_path: Path) -> None:
    path = tmp_path / "examples.jsonl"
    rows = [
        {"text": "ACME LTD\nTOTAL 12.50", "values": {"total": "12.50", "vendor": "ACME LTD"}},
        {"text": "Receipt\nTOTAL 3.00", "values": {"total": "3.00"}},
        {"text": "", "values": {"total": "1"}},  # an empty document teaches nothing and is skipped
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    inline = ExtractExample(text="X\nTOTAL 1.00", values={"total": "1.00"})
    extract = ExtractSpec(fields=FIELDS, examples=[inline], examples_file=str(path))
    examples = load_extraction_examples(extract)
    assert examples[0] == inline and len(examples) == 3
    assert examples[1].values == {"total": "12.50", "vendor": "ACME LTD"}
    assert examples[2].values == {"total": "3.00"}  # the missing vendor is "no value", not an empty string


def test_extraction_examples_from_csv_columns_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.csv"
    pl.DataFrame({"text": ["A\nTOTAL 2.00"], "total": ["2.00"], "vendor": [""]}).write_csv(good)
    [example] = load_extraction_examples(ExtractSpec(fields=FIELDS, examples_file=str(good)))
    assert example.values == {"total": "2.00"}
    typo = tmp_path / "typo.csv"
    pl.DataFrame({"text": ["A"], "totl": ["2.00"]}).write_csv(typo)
    with pytest.raises(ExamplesFileError, match="totl"):
        load_extraction_examples(ExtractSpec(fields=FIELDS, examples_file=str(typo)))
    no_text = tmp_path / "no_text.csv"
    pl.DataFrame({"total": ["2.00"]}).write_csv(no_text)
    with pytest.raises(ExamplesFileError, match="lacks column text"):
        load_extraction_examples(ExtractSpec(fields=FIELDS, examples_file=str(no_text)))


def test_labeled_examples_name_only_the_jobs_labels(tmp_path: Path) -> None:
    classify = ClassifySpec(labels=[LabelSpec(name="a"), LabelSpec(name="b")])
    path = tmp_path / "labels.csv"
    pl.DataFrame({"text": ["one", "two"], "label": ["a", "b"]}).write_csv(path)
    assert load_labeled_examples(classify.model_copy(update={"examples_file": str(path)})) == [
        ("one", "a"),
        ("two", "b"),
    ]
    pl.DataFrame({"text": ["one"], "label": ["c"]}).write_csv(path)
    with pytest.raises(ExamplesFileError, match="labels the job does not define: c"):
        load_labeled_examples(classify.model_copy(update={"examples_file": str(path)}))
