"""Read a classification job's labeled examples file (CSV, JSONL or Parquet; columns text and label)."""

from __future__ import annotations

import io

import fsspec
import polars as pl

from docroute.schemas.spec import ClassifySpec


class ExamplesFileError(ValueError):
    """An examples file that cannot be used; the message names the file and the problem."""


def load_labeled_examples(classify: ClassifySpec) -> list[tuple[str, str]]:
    """Return (text, label) pairs from classify.examples_file, checking every label is one of the job's."""
    path = classify.examples_file
    if path is None:
        return []
    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        raise ExamplesFileError(f"cannot read examples file {path}: {exc}") from exc
    suffix = path.lower().rsplit(".", 1)[-1]
    try:
        if suffix == "csv":
            frame = pl.read_csv(io.BytesIO(data), infer_schema=False)
        elif suffix in ("jsonl", "ndjson"):
            frame = pl.read_ndjson(io.BytesIO(data))
        elif suffix == "parquet":
            frame = pl.read_parquet(io.BytesIO(data))
        else:
            raise ExamplesFileError(f"examples file {path} must be .csv, .jsonl or .parquet")
    except pl.exceptions.PolarsError as exc:
        raise ExamplesFileError(f"examples file {path} is not readable: {exc}") from exc
    missing = {"text", "label"} - set(frame.columns)
    if missing:
        raise ExamplesFileError(f"examples file {path} lacks column(s) {', '.join(sorted(missing))}")
    frame = frame.select(pl.col("text").cast(pl.String), pl.col("label").cast(pl.String)).drop_nulls()
    unknown = sorted(set(frame["label"].unique().to_list()) - set(classify.label_names))
    if unknown:
        raise ExamplesFileError(f"examples file {path} uses labels the job does not define: {', '.join(unknown[:10])}")
    return list(zip(frame["text"].to_list(), frame["label"].to_list(), strict=True))
