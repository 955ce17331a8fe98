"""Sentence encoders for the classification head: the text -> vector step, separate from any generative model.

A head is only as good as the vectors it reads, and the best vectors for short texts do not come from the LM that
scores labels or extraction candidates: mean-pooled Gemma 3 270M (a base LM) reaches 71.5% on 77 banking intents
with 20 examples per intent at ~30 ms per text, the 16 MB static WordLlama encoder 83% at ~0.06 ms. So the encoder is
its own part, named in `small_model.encoder`, and its name travels with every head trained on it.

* `LlamaCppEncoder`: today's embeddings, mean-pooled hidden states of the llama.cpp runtime's model.
* `WordLlamaEncoder`: the `l2_supercat` 256-dimension token table that ships inside the `wordllama` wheel, mean
  pooled. It is loaded from the wheel's own files only; wordllama's `WordLlama.load` would look in `~/.cache` and
  then download from Hugging Face, and no docroute code may fetch weights at run time.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from docroute.engines.base import EngineUnavailableError
from docroute.schemas.spec import EncoderSpec, LlamaCppSpec, SmallModelSpec

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from docroute.engines.local.llama_runtime import LlamaRuntime


@dataclass(frozen=True)
class Encoded:
    """One encoder call: vectors plus what the cost ledger and the truncation flag need."""

    vectors: np.ndarray
    """float32, one L2-normalised row per text (a text with no tokens gives a zero row)."""
    tokens: list[int]
    """Tokens each text has in full."""
    limit: int
    """Tokens read per text; a text with more was truncated to its first `limit`."""
    seconds: float
    """Compute time the call took, attributed evenly to its texts as engine seconds."""


class Encoder(Protocol):
    """Turns texts into fixed-size vectors for a `LabelHead`; `name` identifies the vector space."""

    name: str
    dim: int

    def encode(self, texts: Sequence[str]) -> Encoded: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


class LlamaCppEncoder:
    """The llama.cpp runtime's mean-pooled embeddings, as the embedding head has always read them."""

    def __init__(self, runtime: LlamaRuntime, *, model_name: str, max_tokens: int) -> None:
        self._runtime = runtime
        self._max_tokens = max_tokens
        # the engine's historical name: heads and embedding caches made before encoders existed stay valid
        self.name = f"llamacpp:{model_name}"
        self.dim = runtime.n_embd

    def encode(self, texts: Sequence[str]) -> Encoded:
        started = self._runtime.busy_seconds()  # time holding the model, not time waiting for it
        vectors, tokens = self._runtime.embed(list(texts), max_tokens=self._max_tokens)
        limit = self._runtime.embed_token_limit(self._max_tokens)
        return Encoded(vectors, tokens, limit, self._runtime.busy_seconds() - started)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts).vectors


WORDLLAMA_CONFIG = "l2_supercat"
WORDLLAMA_DIM = 256
_WORDLLAMA_WEIGHTS = f"weights/{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}.safetensors"
_WORDLLAMA_TOKENIZER = f"tokenizers/{WORDLLAMA_CONFIG}_tokenizer_config.json"


@dataclass(frozen=True)
class _WordLlamaModel:
    table: np.ndarray
    tokenizer: Tokenizer
    version: str


_WORDLLAMA: dict[str, _WordLlamaModel] = {}
"""The loaded model by config name: one 16 MB table per process, shared by every engine and shard."""
_WORDLLAMA_LOCK = threading.Lock()


def wordllama_package_dir() -> Path:
    """The installed wordllama package's folder, found without importing it.

    Importing `wordllama` calls `logging.basicConfig(level=INFO)` on the root logger and imports `requests`; docroute
    needs only two of its data files, so it locates them through the import system's spec and never runs its code.
    """
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise EngineUnavailableError(
            "small_model.encoder wordllama needs the PyPI package wordllama (it carries the encoder's weights)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def load_wordllama() -> _WordLlamaModel:
    """Load the bundled token table and tokenizer once per process, from the wheel's files only (never downloads)."""
    with _WORDLLAMA_LOCK:
        if WORDLLAMA_CONFIG in _WORDLLAMA:
            return _WORDLLAMA[WORDLLAMA_CONFIG]
        from importlib.metadata import version

        from safetensors import safe_open
        from tokenizers import Tokenizer

        root = wordllama_package_dir()
        weights, tokenizer_file = root / _WORDLLAMA_WEIGHTS, root / _WORDLLAMA_TOKENIZER
        for required in (weights, tokenizer_file):
            if not required.is_file():
                raise EngineUnavailableError(f"the wordllama wheel lacks {required}; reinstall wordllama>=0.4")
        with safe_open(str(weights), framework="np", device="cpu") as handle:
            table = np.ascontiguousarray(handle.get_tensor("embedding.weight"), dtype=np.float32)
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.no_padding()  # pooling reads each text's own tokens; padding would only cost memory
        tokenizer.no_truncation()  # truncation is ours (max_input_tokens), so token counts stay exact
        _WORDLLAMA[WORDLLAMA_CONFIG] = _WordLlamaModel(table, tokenizer, version("wordllama"))
        return _WORDLLAMA[WORDLLAMA_CONFIG]


class WordLlamaEncoder:
    """Mean of the bundled static token vectors, L2-normalised: what `WordLlamaInference.embed(norm=True)` returns.

    Pooling is done here rather than through `WordLlamaInference` because that class pads each batch to its longest
    text with no truncation, so one long document in a batch of 64 would allocate 64 copies of its full length.
    """

    def __init__(self, *, max_tokens: int) -> None:
        self._model = load_wordllama()
        self._max_tokens = max_tokens
        self.name = f"wordllama:{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}"
        self.dim = int(self._model.table.shape[1])

    def encode(self, texts: Sequence[str]) -> Encoded:
        started = time.perf_counter()
        table = self._model.table
        encodings = self._model.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        tokens = [len(e.ids) for e in encodings]
        vectors = np.zeros((len(texts), self.dim), dtype=np.float32)
        kept = [np.asarray(e.ids[: self._max_tokens], dtype=np.int64) for e in encodings]
        rows = [i for i, ids in enumerate(kept) if len(ids)]
        if rows:
            ids = np.concatenate([kept[i] for i in rows])
            np.clip(ids, 0, table.shape[0] - 1, out=ids)  # as wordllama does: never index past the table
            lengths = np.array([len(kept[i]) for i in rows])
            vectors[rows] = _mean_rows(table, ids, lengths)
        return Encoded(_normalise(vectors), tokens, self._max_tokens, time.perf_counter() - started)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts).vectors


def _mean_rows(table: np.ndarray, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Mean of `table`'s rows over consecutive runs of `ids`, one run per text, as one sparse-by-dense product.

    Gathering `table[ids]` first would allocate tokens × dim floats per batch (≈ 40 MB for 2,048 short messages)
    only to sum it away; the averaging matrix (texts × vocabulary, 1/length per token) gives the same means about
    eight times faster on two cores, without that allocation.
    """
    from scipy.sparse import csr_matrix

    indptr = np.concatenate([[0], np.cumsum(lengths)])
    weights = np.repeat(1.0 / lengths, lengths).astype(table.dtype)
    averaging = csr_matrix((weights, ids, indptr), shape=(len(lengths), table.shape[0]))
    return np.asarray(averaging @ table)


def build_encoder(choice: EncoderSpec, small: SmallModelSpec) -> Encoder:
    """The encoder a job names: the bundled ones by name, served or GPU ones from their own spec.

    The llama.cpp encoder reads the job's own GGUF when the small engine is llama.cpp (the runtime is shared, so it
    is loaded once), and the packaged Gemma 3 270M otherwise.
    """
    if choice == "wordllama":
        return WordLlamaEncoder(max_tokens=small.max_input_tokens)
    if choice == "llamacpp":
        from docroute.engines.local.llama_runtime import packaged_model_path, shared_runtime

        if small.engine == "llamacpp":
            path, name, n_ctx, threads = small.model_path, small.model_name, small.n_ctx, small.n_threads
        else:
            path, name, n_ctx, threads = None, LlamaCppSpec().model_name, 2048, None
        runtime = shared_runtime(path or packaged_model_path(), n_ctx=n_ctx, n_threads=threads)
        return LlamaCppEncoder(runtime, model_name=name, max_tokens=min(small.max_input_tokens, n_ctx))
    from docroute.engines.local import remote_encoders

    if choice.kind == "vllm":
        return remote_encoders.VllmEncoder(choice)
    return remote_encoders.OpenAICompatibleEncoder(choice)


def encoder_choice_named(name: str, configured: EncoderSpec | None) -> EncoderSpec:
    """The encoder spec that gives vectors named `name` (a saved head's encoder), or an error saying why none does."""
    if configured is not None and encoder_name(configured) == name:
        return configured
    if name.startswith("wordllama:"):
        return "wordllama"
    if name.startswith("llamacpp:"):
        return "llamacpp"
    raise EngineUnavailableError(
        f"the classification head reads vectors from encoder {name}; set small_model.encoder to that encoder"
    )


def encoder_name(choice: EncoderSpec, small: SmallModelSpec | None = None) -> str:
    """The vector space an encoder choice gives, without loading it."""
    if choice == "wordllama":
        return f"wordllama:{WORDLLAMA_CONFIG}_{WORDLLAMA_DIM}"
    if choice == "llamacpp":
        model = small.model_name if small is not None and small.engine == "llamacpp" else LlamaCppSpec().model_name
        return f"llamacpp:{model}"
    return choice.name
