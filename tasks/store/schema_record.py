"""The answer schema the committed runs recorded (schemas/evolution.py): read from the manifests, newest first.

Each manifest written since schema evolution carries a `schema` entry. A manifest without one (written before, or
by a step that commits no answers) says nothing about the columns, so the newest manifest that has one decides;
an output none of whose manifests has one returns None, and its next run is taken as compatible.
"""

from __future__ import annotations

import json

from docroute.schemas.evolution import AnswerSchema
from docroute.schemas.spec import OutputSpec
from docroute.tasks.store.state import manifest_paths


def committed_answer_schema(output: OutputSpec, *, up_to: str | None = None) -> AnswerSchema | None:
    """The newest answer schema a committed manifest records (of those up to the manifest `up_to`, when given: the
    schema a run committed then), or None when none records one."""
    fs, names = manifest_paths(output)
    for name in reversed(names):
        if up_to is not None and name > up_to:
            continue
        recorded = json.loads(fs.cat_file(name)).get("schema")
        if recorded:
            return AnswerSchema.from_json(recorded)
    return None
