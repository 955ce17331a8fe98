"""Read the current answer of every document: the committed rows the newest state snapshot points at.

The results folder is an append-only history: a changed file gets a new row in a new part, a deferred row is
answered in a later part. The state snapshot of the newest committed manifest names, for each document, the part
holding its current row, so "current" never depends on clocks or on which files happen to be listed.
"""

from __future__ import annotations

import json

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from docroute.schemas.spec import OutputSpec
from docroute.tasks.state import latest_manifest, load_state, manifests_dir
from docroute.tasks.write import read_parquet


def committed_parts(output: OutputSpec) -> list[str]:
    """Every part the committed manifests name, oldest first (the full history)."""
    fs, root = url_to_fs(manifests_dir(output), **output.fsspec_options())
    fs.invalidate_cache(root)
    try:
        names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    parts: list[str] = []
    for name in names:
        parts += [p["url"] for p in json.loads(fs.cat_file(name))["parts"]]
    return parts


def current_rows(output: OutputSpec) -> pl.DataFrame:
    """One row per document the source still lists: its current answer, result, deferral or error."""
    state = load_state(output)
    if latest_manifest(output) is None or state is None or state.height == 0:
        return pl.DataFrame()
    tables = []
    for (part,), docs in state.group_by(["part_url"], maintain_order=True):
        table = read_parquet(output, str(part))
        wanted = pa.array(docs["doc_id"].to_list(), type=pa.string())
        tables.append(table.filter(pc.is_in(table["doc_id"], value_set=wanted)))
    frame = pl.from_arrow(pa.concat_tables(tables, promote_options="permissive"))
    assert isinstance(frame, pl.DataFrame)
    return frame
