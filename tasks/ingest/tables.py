"""Read a small table the user points a job at (examples, gold labels) from any fsspec URL, by its suffix.

One reader, so every such file accepts the same formats and fails with the same kind of sentence: CSV is read as
text (no guessed types: a label "01" stays "01"), JSON lines with types inferred from every row, Parquet as is.
"""

from __future__ import annotations

import io

import fsspec
import polars as pl

from docroute.schemas.errors import InputError

FORMATS = ".csv, .jsonl or .parquet"


def read_table_file(url: str, error: type[InputError], what: str) -> pl.DataFrame:
    """The file as a frame; `error` naming `what` (e.g. "labels file") and the URL when it cannot be read."""
    try:
        with fsspec.open(url, "rb") as handle:
            data = handle.read()
    except (OSError, ValueError) as exc:
        raise error(f"cannot read {what} {url}: {exc}") from exc
    suffix = url.lower().rsplit(".", 1)[-1]
    try:
        if suffix == "csv":
            return pl.read_csv(io.BytesIO(data), infer_schema=False)
        if suffix in ("jsonl", "ndjson"):
            return pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
        if suffix == "parquet":
            return pl.read_parquet(io.BytesIO(data))
    except pl.exceptions.PolarsError as exc:
        raise error(f"{what} {url} is not readable: {exc}") from exc
    raise error(f"{what} {url} must be {FORMATS}")
