"""Keep every frontier answer as labeled data: `<output>/labels/`, one typed Parquet file per written part.

An escalated row's answer and an audited row's answer both come from the frontier, and a frontier answer is a
label the small model can learn from (`docroute train` reads these). The columns are the result's own typed answer
columns (`label`, one column per extracted field), so a label file reads like the results, plus the document's
parsed text as the model saw it: the label set must stay usable after the source file changes or is deleted, and a
fine-tuning set needs the text itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow as pa
import pyarrow.compute as pc

from docroute.schemas.spec import JobSpec
from docroute.tasks.store.write import write_parquet

_KEYS = ["doc_id", "source_uri", "record_key", "content_sha256", "run_id", "spec_hash", "processed_at"]


def answer_columns(spec: JobSpec) -> list[str]:
    """The result columns that hold the answer itself (label and typed fields), in result order."""
    columns = ["label"] if spec.task.classify is not None else []
    if spec.task.extract is not None:
        columns += [item.name for item in spec.task.extract.fields]
    return columns


def frontier_labels(spec: JobSpec, table: pa.Table, frontier_model: str, texts: Mapping[str, str]) -> pa.Table:
    """The rows of a written part whose final answer the frontier gave: escalations, and audits it answered.

    An audited row carries the frontier's answer whether it agreed (the same answer) or not (the row took it).
    """
    escalated = pc.equal(pc.cast(table["route"], pa.string()), "frontier")
    audited = pc.and_(pc.fill_null(table["audited"], False), pc.is_valid(table["audit_agrees"]))
    chosen = table.filter(pc.or_(escalated, audited))
    kinds = pc.if_else(pc.fill_null(chosen["audited"], False), "audit", "escalation")
    columns = [chosen[name] for name in _KEYS + answer_columns(spec)]
    names = [*_KEYS, *answer_columns(spec)]
    text = pa.array([texts.get(doc_id) for doc_id in chosen["doc_id"].to_pylist()], pa.large_string())
    return pa.Table.from_arrays(
        [*columns, text, kinds, pa.array([frontier_model] * chosen.num_rows, pa.string())],
        names=[*names, "text", "kind", "model"],
    )


def write_labels(spec: JobSpec, url: str, table: pa.Table, frontier_model: str, texts: Mapping[str, str]) -> int:
    """Write the part's frontier labels (nothing when there are none); returns how many."""
    labels = frontier_labels(spec, table, frontier_model, texts)
    if labels.num_rows:
        write_parquet(spec.output, url, labels)
    return labels.num_rows
