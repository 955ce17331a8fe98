"""Embeddings of labeled texts, kept between `docroute train` runs so each text is embedded once per model.

Every training round refits the head on all labels so far; embedding them all again would make round k cost k
times round one. Vectors are stored under `<output>/training/embeddings/<encoder key>/`, one Parquet file per round
with the vectors it added, keyed by a hash of the text; the model key covers everything that shapes a vector (the
model, the encoder that turns texts into vectors, and how much of a text it reads), so a changed model or encoder
starts a new cache rather than mixing vector spaces.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from docroute.schemas.spec import JobSpec
from docroute.tasks.store.write import write_parquet


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def model_key(encoder: str, max_input_tokens: int) -> str:
    """Name the vector space: the encoder that makes the vectors and how much of a text it reads."""
    return hashlib.sha256(f"{encoder}\x00{max_input_tokens}".encode()).hexdigest()[:16]


class EmbeddingCache:
    """Vectors by text hash for one job's encoder; `embed` computes only the missing ones."""

    def __init__(self, spec: JobSpec, encoder: str) -> None:
        self._spec = spec
        key = model_key(encoder, spec.small_model.max_input_tokens)
        self._root = spec.output.layout.embeddings(key)
        self._vectors: dict[str, np.ndarray] = {}
        self._new: dict[str, np.ndarray] = {}
        fs, path = url_to_fs(self._root, **spec.output.fsspec_options())
        if fs.exists(path):
            for file in sorted(fs.glob(f"{path}/*.parquet")):
                with fs.open(file, "rb") as handle:
                    table = pq.read_table(handle)
                vectors = np.asarray(table["vector"].combine_chunks().flatten(), dtype=np.float32)
                keys = table["key"].to_pylist()
                for key, vector in zip(keys, vectors.reshape(len(keys), -1), strict=True):
                    self._vectors[key] = vector

    def __len__(self) -> int:
        return len(self._vectors) + len(self._new)

    def embed(self, texts: Sequence[str], compute: Callable[[Sequence[str]], np.ndarray]) -> np.ndarray:
        """One row per text, in order; texts not seen before go through `compute` in one call."""
        keys = [text_key(t) for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._vectors and k not in self._new}
        if missing:
            computed = np.asarray(compute(list(missing.values())), dtype=np.float32)
            self._new.update(zip(missing, computed, strict=True))
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.vstack([self._vectors.get(k, self._new.get(k)) for k in keys])

    def save(self, version: str) -> int:
        """Write the vectors this round added; returns how many."""
        if not self._new:
            return 0
        keys = list(self._new)
        matrix = np.vstack([self._new[k] for k in keys]).astype(np.float32)
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
        table = pa.table({"key": pa.array(keys, pa.string()), "vector": vectors})
        write_parquet(self._spec.output, f"{self._root}/embeddings-{version}.parquet", table, dictionary=False)
        self._vectors.update(self._new)
        self._new = {}
        return len(keys)
