"""Encoders whose model lives outside this process's llama.cpp: an embedding model under vLLM, or a served endpoint.

Both give what `engines/local/encoders.py`'s `Encoder` protocol promises (`name`, `dim`, `encode`, `embed`): one
L2-normalised float32 row per text, a zero row and zero tokens for a text with nothing in it (never sent: vLLM
rejects an empty prompt and many servers an empty input), and token counts the cost ledger can trust.

* `VllmEncoder`: an embedding model under vLLM's pooling runner (`vllm.LLM(..., runner="pooling")`, then
  `LLM.embed`), one `LLM` per process per model. Texts are tokenized with the `LLM`'s own tokenizer, so the count
  of a text's tokens is exact, and cut to `max_input_tokens` by that tokenizer's own truncation, which is what
  vLLM's `truncate_prompt_tokens` does to a text prompt (vllm/renderers/params.py `get_encode_kwargs`:
  `truncation=True, max_length=k`): special tokens kept, the tokenizer's side (the end, for embedding models).
  vLLM's option itself is not used because it has moved three times (an `LLM.embed` keyword, a
  `PoolingParams` field, now `tokenization_kwargs`), once meant "keep the last k" and only reports the tokens
  it kept, never how many the text had; the vectors are computed by vLLM from exactly the ids sent, whose
  count it reports back in `prompt_token_ids` and which is checked.
* `OpenAICompatibleEncoder`: `POST /v1/embeddings` through the `openai` SDK (OpenAI, `vllm serve`,
  llama.cpp's server, ...), `batch_size` texts a request, at most `max_concurrency` requests in flight across
  every thread using the encoder, the SDK's own retries, errors scrubbed of the key. A remote model's tokenizer
  is unknown here, so texts are cut at about `max_input_tokens` tokens by characters (4 a token,
  engines/scoring/prompts.py `truncate_text_to_tokens`) and the cut ones are marked. The server's `usage.prompt_tokens`
  is per request: it is split over the request's texts by length, so the rows add up to what was billed.

Engines report tokens, never dollars: `schemas/pricing.py` `encoder_cost_usd` prices them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from docroute.engines.base import PLACEHOLDER_API_KEY, EngineError, EngineUnavailableError, one_line, redact
from docroute.engines.local.encoders import Encoded
from docroute.engines.local.vllm import import_vllm, require_gpu
from docroute.engines.scoring.prompts import truncate_text_to_tokens
from docroute.schemas.spec import OpenAICompatibleEncoderSpec, VllmEncoderSpec

if TYPE_CHECKING:
    import openai

log = logging.getLogger(__name__)

_ERROR_CHARS = 300


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as float32; an all-zero row stays zero (no NaN)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


def is_blank(text: str) -> bool:
    """A text with nothing to embed: it gets a zero row and no tokens, and is never sent."""
    return not text.strip()


# ----------------------------------------------------------------------------------------------------------
# what the cost ledger reads


@dataclass(frozen=True)
class MeteredEncoded(Encoded):
    """An `Encoded` from an encoder whose truncation and billing are not a plain per-text token limit.

    `Encoded.tokens > limit` cannot say which texts a character budget cut, and `min(tokens, limit)` is not what a
    provider billed for a cut text, so these two lists say it per text; `row_usage` reads either kind.
    """

    input_tokens: list[int]
    """Tokens billed per text (0 for a blank one); they add up to the provider's reported usage."""
    truncated: list[bool]
    """Which texts were cut before they were sent."""


def row_usage(encoded: Encoded, position: int) -> tuple[int, bool]:
    """(input tokens to bill, whether it was truncated) for one text of an encoder call, for any `Encoded`."""
    if isinstance(encoded, MeteredEncoded):
        return encoded.input_tokens[position], encoded.truncated[position]
    tokens = encoded.tokens[position]
    return min(tokens, encoded.limit), tokens > encoded.limit


def apportion_tokens(total: int, weights: Sequence[int]) -> list[int]:
    """Split a request's billed tokens over its texts in proportion to `weights`, in integers summing to `total`.

    Largest remainders, so no row drifts by more than one token from its exact share; equal shares when every
    weight is zero.
    """
    if not weights:
        return []
    total = max(int(total), 0)
    weight_sum = sum(max(w, 0) for w in weights)
    shares = [total * max(w, 0) / weight_sum for w in weights] if weight_sum else [total / len(weights)] * len(weights)
    parts = [math.floor(s) for s in shares]
    short = total - sum(parts)
    for i in sorted(range(len(shares)), key=lambda i: (parts[i] - shares[i], i))[:short]:
        parts[i] += 1
    return parts


# ----------------------------------------------------------------------------------------------------------
# vLLM


POOLING_RUNNER = "pooling"
"""vLLM >= 0.10's `runner` for embedding (and other pooling) models; earlier versions took `task="embed"`."""


def engine_arg_names(vllm_module: Any) -> frozenset[str]:
    """The keyword arguments `vllm.LLM` forwards to `EngineArgs` (a dataclass in every vLLM this supports)."""
    try:
        return frozenset(f.name for f in dataclasses.fields(vllm_module.EngineArgs))
    except (AttributeError, TypeError):
        return frozenset()


def vllm_encoder_llm_kwargs(spec: VllmEncoderSpec, engine_args: Collection[str]) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments for an embedding model.

    `runner="pooling"` where `EngineArgs` has a `runner` field (vLLM >= 0.10; pyproject asks >= 0.12), else the
    older `task="embed"`. vLLM converts a `*Model`/`*ForCausalLM` checkpoint to an embedding model under the pooling
    runner on its own (`convert="auto"`).
    """
    kwargs: dict[str, Any] = {
        "model": spec.model,
        "dtype": spec.dtype,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
    }
    if "runner" in engine_args:
        kwargs["runner"] = POOLING_RUNNER
    else:
        kwargs["task"] = "embed"
    if spec.max_model_len is not None:
        kwargs["max_model_len"] = spec.max_model_len
    return kwargs


def tokenize_for_embedding(tokenizer: Any, texts: Sequence[str], limit: int) -> tuple[list[list[int]], list[int]]:
    """(token ids to send, cut to `limit`; each text's full token count), both with the model's special tokens.

    The full count is what the text has; only texts over `limit` are tokenized a second time, with the tokenizer's
    own truncation (special tokens kept), as vLLM truncates a text prompt. A tokenizer that ignored `max_length`
    is cut by slicing.
    """
    if not texts:
        return [], []
    full = [list(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]
    counts = [len(ids) for ids in full]
    over = [i for i, n in enumerate(counts) if n > limit]
    if over:
        cut = tokenizer([texts[i] for i in over], add_special_tokens=True, truncation=True, max_length=limit)
        for i, ids in zip(over, cut["input_ids"], strict=True):
            full[i] = list(ids)[:limit]
    return full, counts


def read_embedding_outputs(outputs: Sequence[Any], sent: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[int]]:
    """Vectors (normalised float32, one row per output) and tokens read from vLLM's embedding outputs.

    Reads `EmbeddingRequestOutput` (`outputs.embedding`, a list of floats, what `LLM.embed` returns) and
    `PoolingRequestOutput` (`outputs.data`, a tensor, what `LLM.encode` returns). A request vLLM failed (its
    `error`), a missing or non-vector embedding, vectors of different widths, or a prompt length other than the
    ids sent raise EngineError: the encoder never guesses a vector.
    """
    if len(outputs) != len(sent):
        raise EngineError(f"vLLM returned {len(outputs)} embeddings for {len(sent)} texts")
    rows: list[np.ndarray] = []
    read: list[int] = []
    for output, ids in zip(outputs, sent, strict=True):
        error = getattr(output, "error", None)
        if error is not None:
            raise EngineError(f"vLLM could not embed a text: {_brief(str(getattr(error, 'message', error)))}")
        pooled = getattr(output, "outputs", None)
        data = getattr(pooled, "embedding", None)
        if data is None:
            data = getattr(pooled, "data", None)
        vector = _as_vector(data)
        if vector.ndim != 1 or vector.size == 0:
            raise EngineError(
                f"vLLM returned an embedding of shape {vector.shape} for a text: the model's pooling task is not "
                "a single-vector embed (token_embed or late chunking?)"
            )
        if rows and vector.size != rows[0].size:
            raise EngineError(f"vLLM returned embeddings of {rows[0].size} and {vector.size} dimensions in one call")
        prompt = getattr(output, "prompt_token_ids", None)
        tokens = len(prompt) if prompt is not None else len(ids)
        if tokens != len(ids):
            raise EngineError(f"vLLM read {tokens} tokens of a text sent as {len(ids)}")
        rows.append(vector)
        read.append(tokens)
    if not rows:
        return np.zeros((0, 0), dtype=np.float32), []
    return l2_normalise(np.stack(rows)), read


def _as_vector(data: Any) -> np.ndarray:
    if data is None:
        return np.zeros(0, dtype=np.float32)
    if hasattr(data, "detach"):  # a torch tensor, possibly bfloat16, which numpy cannot read directly
        data = data.detach().float().cpu().numpy()
    return np.asarray(data, dtype=np.float32)


class VllmEmbeddingRuntime:
    """One `vllm.LLM` under the pooling runner and its tokenizer; `embed` runs one `LLM.embed` at a time."""

    def __init__(self, spec: VllmEncoderSpec, vllm_module: ModuleType | None = None) -> None:
        vllm = vllm_module or import_vllm()
        require_gpu(1)
        kwargs = vllm_encoder_llm_kwargs(spec, engine_arg_names(vllm))
        try:
            self.llm = vllm.LLM(**kwargs)
        except (ValueError, RuntimeError, OSError, TypeError) as exc:
            raise EngineUnavailableError(f"vLLM could not load embedding model {spec.model}: {exc}") from exc
        model_config = getattr(self.llm, "model_config", None) or self.llm.llm_engine.model_config
        runner = getattr(model_config, "runner_type", POOLING_RUNNER)
        if runner != POOLING_RUNNER:
            raise EngineUnavailableError(
                f"vLLM loaded {spec.model} with the {runner} runner, not as an embedding model"
            )
        self.tokenizer = self.llm.get_tokenizer()
        self.max_model_len = int(model_config.max_model_len)
        encoder_config = getattr(model_config, "encoder_config", None) or {}
        self.lower_case = bool(encoder_config.get("do_lower_case", False))
        """A sentence-transformers model that lower-cases its input; vLLM does it to text prompts, so this does."""
        self.lock = threading.Lock()  # vllm.LLM is not thread-safe: shards of one process take turns

    def embed(self, prompts: list[list[int]]) -> tuple[list[Any], float]:
        """One `LLM.embed` over token prompts; the outputs in prompt order and the seconds it took (not the wait)."""
        with self.lock:
            started = time.perf_counter()
            try:
                outputs = self.llm.embed([{"prompt_token_ids": ids} for ids in prompts], use_tqdm=False)
            except ValueError as exc:  # e.g. the model's pooler offers no "embed" task
                raise EngineError(f"vLLM could not embed with this model: {_brief(str(exc))}") from exc
            return list(outputs), time.perf_counter() - started


_VLLM_RUNTIMES: dict[tuple[Any, ...], VllmEmbeddingRuntime] = {}
_VLLM_RUNTIMES_LOCK = threading.Lock()


def vllm_runtime_key(spec: VllmEncoderSpec) -> tuple[Any, ...]:
    """What the loaded model depends on (`max_input_tokens` does not: it only cuts texts)."""
    return (spec.model, spec.dtype, spec.max_model_len, spec.gpu_memory_utilization)


def shared_vllm_runtime(spec: VllmEncoderSpec) -> VllmEmbeddingRuntime:
    """This process's runtime for the spec's model, loaded on first use (never per shard)."""
    key = vllm_runtime_key(spec)
    with _VLLM_RUNTIMES_LOCK:
        runtime = _VLLM_RUNTIMES.get(key)
        if runtime is None:
            runtime = _VLLM_RUNTIMES[key] = VllmEmbeddingRuntime(spec)
        return runtime


class VllmEncoder:
    """An embedding model under vLLM on this process's GPU.

    `tokens` are exact (the model's own tokenizer, special tokens included) and `limit` is `max_input_tokens`
    (capped at the model's context), so `Encoded`'s plain rule (a text with more than `limit` tokens was cut to
    its first `limit`) holds.
    """

    def __init__(self, spec: VllmEncoderSpec, runtime: VllmEmbeddingRuntime | None = None) -> None:
        self.spec = spec
        self.name = spec.name
        self._runtime = runtime or shared_vllm_runtime(spec)
        self.limit = min(spec.max_input_tokens, self._runtime.max_model_len)
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """The width of the model's vectors, read from its first output (one short text embedded if none yet)."""
        if self._dim is None:
            self.encode(["dimension"])
        assert self._dim is not None
        return self._dim

    def encode(self, texts: Sequence[str]) -> Encoded:
        texts = list(texts)
        sent_rows = [i for i, text in enumerate(texts) if not is_blank(text)]
        to_tokenize = [texts[i].lower() if self._runtime.lower_case else texts[i] for i in sent_rows]
        ids, counts = tokenize_for_embedding(self._runtime.tokenizer, to_tokenize, self.limit)
        keep = [k for k, row_ids in enumerate(ids) if row_ids]  # a tokenizer may give no ids at all
        tokens = [0] * len(texts)
        for k, row in enumerate(sent_rows):
            tokens[row] = counts[k]
        seconds = 0.0
        read_rows: np.ndarray | None = None
        if keep:
            outputs, seconds = self._runtime.embed([ids[k] for k in keep])
            read_rows, _ = read_embedding_outputs(outputs, [ids[k] for k in keep])
            if self._dim is None:
                self._dim = int(read_rows.shape[1])
            elif read_rows.shape[1] != self._dim:
                raise EngineError(f"{self.name} returned {read_rows.shape[1]}-dimension vectors, earlier {self._dim}")
        vectors = np.zeros((len(texts), self.dim if texts else (self._dim or 0)), dtype=np.float32)
        if read_rows is not None:
            vectors[[sent_rows[k] for k in keep]] = read_rows
        return Encoded(vectors, tokens, self.limit, seconds)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts).vectors


# ----------------------------------------------------------------------------------------------------------
# an OpenAI-compatible /v1/embeddings endpoint


OPENAI_EMBEDDING_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
"""Full widths of OpenAI's embedding models, so `dim` needs no paid call on OpenAI's own API."""

DIM_PROBE_TEXT = "dimension"


class EmbeddingsRequestError(EngineError):
    """An embeddings request failed after the SDK's retries; the message never holds the API key.

    `retryable`: whether a later run may succeed (a connection failure, a timeout, 408/409/429/5xx); a rejected
    key, an unknown model or a bad request will not.
    """

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class EmbeddingsResponseError(EngineError):
    """The server answered, but not with one vector per text (too few, token-level, the wrong width)."""


def _api_key(spec: OpenAICompatibleEncoderSpec) -> str | None:
    """The spec's key, else the environment variable it names (OPENAI_API_KEY for OpenAI's own API)."""
    if spec.api_key is not None:
        return spec.api_key.get_secret_value()
    env = spec.api_key_env or (None if spec.base_url else "OPENAI_API_KEY")
    return (os.environ.get(env) or None) if env else None


class OpenAICompatibleEncoder:
    """Vectors from an embeddings endpoint, `batch_size` texts a request, `max_concurrency` requests in flight.

    A thread pool of `max_concurrency` workers, shared by every thread that calls `encode`, sends the requests
    through one synchronous `openai.OpenAI` client (one connection pool); the SDK retries 408/409/429/5xx,
    timeouts and connection errors `max_retries` times with backoff. Any request that still fails fails the whole
    `encode` with an `EmbeddingsRequestError` (the classifier engine then fails its batch, which a later run
    retries): a vector is never guessed. `close()` stops the pool and the client.
    """

    def __init__(self, spec: OpenAICompatibleEncoderSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.limit = spec.max_input_tokens
        self._api_key = _api_key(spec)
        if spec.base_url is None and not self._api_key:
            raise EngineUnavailableError(
                "no OpenAI API key for small_model.encoder: set its api_key, or the environment variable named by "
                "api_key_env (default OPENAI_API_KEY)"
            )
        self._where = spec.base_url or "OpenAI's API"
        import openai  # here, not at import: a run that never embeds through an API does not pay for the SDK

        self._client = openai.OpenAI(
            api_key=self._api_key or PLACEHOLDER_API_KEY,
            base_url=spec.base_url,
            timeout=spec.timeout_s,
            max_retries=spec.max_retries,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._dim: int | None = spec.dimensions or (
            OPENAI_EMBEDDING_DIMS.get(spec.model) if spec.base_url is None else None
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleEncoder(name={self.name!r}, base_url={self.spec.base_url!r})"

    @property
    def dim(self) -> int:
        """The vectors' width: `dimensions` when set, OpenAI's table, else read from the first response.

        Asked before any `encode`, it sends one one-word request; its few tokens are not in any ledger (only a
        self-hosted server or a model missing from the table gets here).
        """
        if self._dim is None:
            self._request([DIM_PROBE_TEXT])
        assert self._dim is not None
        return self._dim

    def encode(self, texts: Sequence[str]) -> MeteredEncoded:
        """Embed texts in order; blank ones get a zero row and 0 tokens without being sent."""
        started = time.perf_counter()
        texts = list(texts)
        sent: list[tuple[int, str]] = []
        truncated = [False] * len(texts)
        for row, text in enumerate(texts):
            if is_blank(text):
                continue
            cut, truncated[row] = truncate_text_to_tokens(text, self.limit)
            sent.append((row, cut))
        batches = [sent[i : i + self.spec.batch_size] for i in range(0, len(sent), self.spec.batch_size)]
        results = self._run([[text for _, text in batch] for batch in batches])
        input_tokens = [0] * len(texts)
        vectors: np.ndarray | None = None
        for batch, (rows, billed) in zip(batches, results, strict=True):
            if vectors is None:
                vectors = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
            vectors[[row for row, _ in batch]] = rows
            shares = apportion_tokens(billed, [len(text) for _, text in batch])
            for (row, _), share in zip(batch, shares, strict=True):
                input_tokens[row] = share
        if vectors is None:
            vectors = np.zeros((len(texts), self.dim if texts else (self._dim or 0)), dtype=np.float32)
        tokens = [self._full_tokens(texts[i], input_tokens[i], truncated[i]) for i in range(len(texts))]
        return MeteredEncoded(
            vectors, tokens, self.limit, time.perf_counter() - started, input_tokens=input_tokens, truncated=truncated
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encode(texts).vectors

    def close(self) -> None:
        """Stop the request pool and close the client's connections; a later `encode` starts a new pool."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> OpenAICompatibleEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------

    def _full_tokens(self, text: str, billed: int, cut: bool) -> int:
        """`Encoded.tokens` for one text: its billed tokens, or for a cut text an estimate of the whole text's,
        above `limit`, so code that reads only `tokens > limit` still sees it was truncated."""
        if not cut:
            return billed
        sent_chars = len(truncate_text_to_tokens(text, self.limit)[0]) or 1
        return max(math.ceil(billed * len(text) / sent_chars), self.limit + 1)

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self.spec.max_concurrency, thread_name_prefix="docroute-embeddings"
                )
            return self._pool

    def _run(self, batches: list[list[str]]) -> list[tuple[np.ndarray, int]]:
        """Send every batch through the shared pool; results in batch order, or the first failure raised."""
        if not batches:
            return []
        if len(batches) == 1:
            return [self._request(batches[0])]
        pool = self._executor()
        futures: list[Future[tuple[np.ndarray, int]]] = [pool.submit(self._request, batch) for batch in batches]
        try:
            return [future.result() for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # those not started yet: their vectors would be thrown away
            raise

    def _request(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """One `POST /v1/embeddings`: the normalised vectors in input order and the request's billed tokens."""
        kwargs: dict[str, Any] = {"model": self.spec.model, "input": texts, "encoding_format": "float"}
        if self.spec.dimensions is not None:
            kwargs["dimensions"] = self.spec.dimensions
        import openai

        try:
            response = self._client.embeddings.create(**kwargs)
        except openai.OpenAIError as exc:
            # `from None`: the SDK's exception (and its cause) may quote the key; the chain would carry it to logs
            raise self._request_error(exc) from None
        vectors = self._read(response, len(texts))
        usage = getattr(response, "usage", None)
        billed = getattr(usage, "prompt_tokens", None) if usage is not None else None
        if billed is None:  # a server that reports no usage: bill the character estimate rather than nothing
            billed = sum(math.ceil(len(text) / 4) for text in texts)
        return vectors, int(billed)

    def _read(self, response: Any, expected: int) -> np.ndarray:
        data = list(getattr(response, "data", None) or [])
        if len(data) != expected:
            raise EmbeddingsResponseError(
                f"{self._where} returned {len(data)} embeddings for {expected} texts (model {self.spec.model})"
            )
        indices = [getattr(item, "index", None) for item in data]
        if all(isinstance(i, int) for i in indices) and sorted(indices) == list(range(expected)):
            data = [item for _, item in sorted(zip(indices, data, strict=True), key=lambda pair: pair[0])]
        try:
            matrix = np.asarray([item.embedding for item in data], dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise EmbeddingsResponseError(
                f"{self._where} returned embeddings that are not one flat vector per text (model {self.spec.model}): "
                "a llama.cpp server needs a pooling type other than none"
            ) from exc
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise EmbeddingsResponseError(
                f"{self._where} returned embeddings of shape {matrix.shape[1:]} per text (model {self.spec.model}): "
                "token-level vectors? a llama.cpp server needs a pooling type other than none"
            )
        width = int(matrix.shape[1])
        if self.spec.dimensions is not None and width != self.spec.dimensions:
            raise EmbeddingsResponseError(
                f"{self._where} returned {width}-dimension vectors for dimensions={self.spec.dimensions} "
                f"(model {self.spec.model} or the server ignores `dimensions`)"
            )
        if self._dim is None:
            self._dim = width
        elif width != self._dim:
            raise EmbeddingsResponseError(f"{self._where} returned {width}-dimension vectors, earlier {self._dim}")
        return l2_normalise(matrix)

    def _request_error(self, exc: openai.OpenAIError) -> EmbeddingsRequestError:
        """A clear, key-free error for a request the SDK gave up on."""
        from docroute.engines.remote.openai_compat import OPENAI_ERRORS

        failure = OPENAI_ERRORS.read(exc)
        detail = failure.message
        if failure.status is not None:
            detail = f"HTTP {failure.status}: {detail}"
            if failure.status in (401, 403):
                detail += " (check small_model.encoder's api_key / api_key_env)"
            elif failure.status == 404:
                detail += f" (does {self._where} serve model {self.spec.model}?)"
        tries = f" after {self.spec.max_retries} retries" if failure.retryable and self.spec.max_retries else ""
        message = (
            f"embeddings request to {self._where} (model {self.spec.model}) failed{tries}: "
            f"{type(exc).__name__}: {detail}"
        )
        return EmbeddingsRequestError(
            _brief(redact(message, self._api_key)), retryable=failure.retryable, status=failure.status
        )


def _brief(text: str) -> str:
    return one_line(text, _ERROR_CHARS)
