"""Read a job's examples files: labeled texts for classification, worked documents for extraction."""

from __future__ import annotations

import polars as pl

from docroute.schemas.errors import InputError
from docroute.schemas.spec import ClassifySpec, ExtractExample, ExtractSpec
from docroute.tasks.ingest.tables import read_table_file


class ExamplesFileError(InputError, ValueError):
    """An examples file that cannot be used; the message names the file and the problem."""


def load_labeled_examples(classify: ClassifySpec) -> list[tuple[str, str]]:
    """Return (text, label) pairs from classify.examples_file, checking every label is one of the job's."""
    path = classify.examples_file
    if path is None:
        return []
    frame = read_table_file(path, ExamplesFileError, "examples file")
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ExamplesFileError(f"examples file {path} lacks column(s) {', '.join(sorted(missing))}")
    frame = frame.select(pl.col("text").cast(pl.String), pl.col("label").cast(pl.String)).drop_nulls()
    unknown = sorted(set(frame["label"].unique().to_list()) - set(classify.label_names))
    if unknown:
        raise ExamplesFileError(f"examples file {path} uses labels the job does not define: {', '.join(unknown[:10])}")
    return list(zip(frame["text"].to_list(), frame["label"].to_list(), strict=True))


def load_extraction_examples(extract: ExtractSpec) -> list[ExtractExample]:
    """The inline worked examples, then the examples file's: each a text and the values a careful reader takes.

    JSONL rows carry `text` and `values` (an object keyed by field name); CSV and Parquet carry `text` and one column
    per field. Fields a row leaves out or leaves empty count as "no value"; a column naming no field is an error
    (a typo would otherwise silently teach nothing).
    """
    examples = list(extract.examples)
    path = extract.examples_file
    if path is None:
        return examples
    frame = read_table_file(path, ExamplesFileError, "examples file")
    if "text" not in frame.columns:
        raise ExamplesFileError(f"examples file {path} lacks column text")
    names = {field.name for field in extract.fields}
    if "values" in frame.columns:
        rows = [(row["text"], row["values"] or {}) for row in frame.select("text", "values").iter_rows(named=True)]
    else:
        unknown = sorted(set(frame.columns) - names - {"text"})
        if unknown:
            raise ExamplesFileError(f"examples file {path} has columns that name no field: {', '.join(unknown)}")
        fields = [c for c in frame.columns if c in names]
        rows = [(row["text"], {f: row[f] for f in fields}) for row in frame.iter_rows(named=True)]
    for number, (text, values) in enumerate(rows, start=1):
        if not text:
            continue
        unknown = sorted(set(values) - names)
        if unknown:
            raise ExamplesFileError(f"examples file {path} row {number} names unknown fields: {', '.join(unknown)}")
        kept = {name: value for name, value in values.items() if value is not None and value != ""}
        examples.append(ExtractExample(text=str(text), values=kept))
    return examples
