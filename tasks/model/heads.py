"""Versioned classification heads, stored beside the routers they were certified with.

`docroute train` writes `<output>/heads/head-<version>.npz` for every candidate it fits; the router that certified a
head names it (`head_version`), so promoting a head is writing `router.json` and nothing else: a run either sees the
old router with the old head or the new router with the new head, never a mix.
"""

from __future__ import annotations

from fsspec.core import url_to_fs

from docroute.engines.local.head import LabelHead
from docroute.schemas.errors import StateError
from docroute.schemas.spec import JobSpec
from docroute.tasks.store.write import atomic_write


class HeadMissingError(StateError, FileNotFoundError):
    """The router names a head whose file is gone: the run cannot use the router's certificate without it."""


def write_head(spec: JobSpec, version: str, head: LabelHead) -> str:
    url = spec.output.layout.head(version)
    data = head.to_bytes()
    atomic_write(spec.output, url, lambda handle: handle.write(data))
    return url


def load_head(spec: JobSpec, version: str) -> LabelHead:
    url = spec.output.layout.head(version)
    fs, path = url_to_fs(url, **spec.output.fsspec_options())
    try:
        with fs.open(path, "rb") as handle:
            return LabelHead.from_bytes(handle.read())
    except FileNotFoundError as exc:
        raise HeadMissingError(f"the router's classification head {url} does not exist") from exc
