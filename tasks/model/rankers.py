"""Versioned extraction rankers, stored beside the routers they were certified with (as tasks/model/heads.py for heads).

`docroute train` writes `<output>/rankers/ranker-<version>.npz` for a candidate it fits on an extraction task; the
router that certified it names the round (`head_version`: the round's trained artifacts, a head, a ranker or both),
so promoting a ranker is writing `router.json` and nothing else.
"""

from __future__ import annotations

from fsspec.core import url_to_fs

from docroute.engines.extract.ranker import ExtractionRanker
from docroute.schemas.spec import JobSpec
from docroute.tasks.store.write import atomic_write


def write_ranker(spec: JobSpec, version: str, ranker: ExtractionRanker) -> str:
    url = spec.output.layout.ranker(version)
    data = ranker.to_bytes()
    atomic_write(spec.output, url, lambda handle: handle.write(data))
    return url


def load_ranker(spec: JobSpec, version: str) -> ExtractionRanker | None:
    """The round's ranker, or None when that round trained none (a classification-only round)."""
    fs, path = url_to_fs(spec.output.layout.ranker(version), **spec.output.fsspec_options())
    try:
        with fs.open(path, "rb") as handle:
            return ExtractionRanker.from_bytes(handle.read())
    except FileNotFoundError:
        return None
