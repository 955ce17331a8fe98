"""Read a file of gold answers (CSV, JSONL or Parquet) keyed by document path, for calibration and evaluation.

Columns: `path` (relative to the job's source URL, or a full URI) and, for records inside json/jsonl files,
`record_key`; then `label` for classification and/or one column per extracted field. Answers are matched to
documents by the same stable `doc_id` the result rows carry.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from docroute.schemas.errors import InputError
from docroute.schemas.spec import JobSpec
from docroute.tasks.ingest.discover import source_filesystem
from docroute.tasks.ingest.read import document_id
from docroute.tasks.ingest.tables import read_table_file


class LabelsFileError(InputError, ValueError):
    """A labels file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class LabelSet:
    """Gold answers by doc_id, and the files they come from (to read only those)."""

    answers: dict[str, dict[str, Any]]
    uris: frozenset[str]
    source: str


def load_labels(spec: JobSpec, url: str) -> LabelSet:
    """Read gold answers as {doc_id: {"label": …, field: …}} with raw values (compare them with schemas.compare)."""
    frame = read_table_file(url, LabelsFileError, "labels file")
    key = "path" if "path" in frame.columns else "source_uri" if "source_uri" in frame.columns else None
    if key is None:
        raise LabelsFileError(f"labels file {url} needs a `path` (or `source_uri`) column naming each document")
    parts = (["label"] if spec.task.classify else []) + (
        [f.name for f in spec.task.extract.fields] if spec.task.extract else []
    )
    present = [p for p in parts if p in frame.columns]
    if not present:
        raise LabelsFileError(f"labels file {url} has none of the job's answer columns: {', '.join(parts)}")
    fs, root = source_filesystem(spec.source)
    labels: dict[str, dict[str, Any]] = {}
    uris: set[str] = set()
    for row in frame.iter_rows(named=True):
        path = str(row[key])
        uri = path if "://" in path else fs.unstrip_protocol(posixpath.join(root, path.lstrip("/")))
        record = row.get("record_key")
        doc_id = document_id(uri, None if record in (None, "") else str(record))
        labels[doc_id] = {part: row[part] for part in present}
        uris.add(uri)
    if spec.task.classify is not None and "label" in present:
        unknown = sorted(
            {str(v["label"]) for v in labels.values() if v["label"] is not None} - set(spec.task.classify.label_names)
        )
        if unknown:
            raise LabelsFileError(f"labels file {url} uses labels the job does not define: {', '.join(unknown[:10])}")
    return LabelSet(labels, frozenset(uris), url)
