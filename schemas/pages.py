"""A scanned document's pages as images, for an engine that looks at pages (the vLLM vision path).

The ingest layer knows how to get the pixels (read the file again, render PDF pages, decode image frames); an engine
knows how many pages and how many pixels it wants. `PageImages` is the handshake: the ingest layer builds one per
scanned document, the engine calls `render` when it sends that document, and nothing is decoded before then. So a
shard holds at most the images of the documents in one model call, never a rendered copy of every page it read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


class PageImagesError(Exception):
    """The pages cannot be rendered now (the file changed or vanished since it was read, or cannot be decoded)."""


@dataclass(frozen=True, slots=True, eq=False)
class PageImages:
    """How to get one document's page images, and what they are.

    `render(pages, max_pixels)` returns the document's first `pages` page images (PIL RGB images) in page order,
    each of at most `max_pixels` pixels, or raises PageImagesError. `key` names the document's content (its
    SHA-256), so an engine can tell two requests for the same pages apart from two documents. `count` is the
    document's page count.
    """

    key: str
    count: int
    render: Callable[[int, int], Sequence[Any]]
