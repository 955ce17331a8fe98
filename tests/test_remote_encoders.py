"""Remote encoders: the OpenAI-compatible one against a REAL embeddings server, the vLLM one without a GPU.

The server is llama-cpp-python's, serving the packaged Gemma 3 270M with embeddings on. Its GGUF declares no
pooling, which makes llama.cpp return one vector per token; `gemma3.pooling_type=int:1` (a GGUF metadata override)
gives mean pooling, how one serves such a model as an embedding model. It checks a bearer key, so a wrong key
gets a real 401.

vLLM runs only on a GPU: without one these tests check what can be checked honestly: the `vllm.LLM` arguments
(against vLLM's own `EngineArgs` where vllm imports), the conversion of vLLM's own output classes, the
tokenization with a real Hugging Face tokenizer, and the error when vllm is missing. No test produces a vector
that claims to come from vLLM.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import numpy as np
import pytest

from docroute.engines.base import EngineError, EngineUnavailableError
from docroute.engines.local import remote_encoders
from docroute.engines.local.encoders import Encoded
from docroute.engines.local.remote_encoders import (
    EmbeddingsRequestError,
    EmbeddingsResponseError,
    MeteredEncoded,
    OpenAICompatibleEncoder,
    VllmEncoder,
    apportion_tokens,
    engine_arg_names,
    read_embedding_outputs,
    row_usage,
    tokenize_for_embedding,
    vllm_encoder_llm_kwargs,
)
from docroute.engines.local.vllm import INSTALL_HINT
from docroute.schemas.pricing import DEFAULT_PRICES, ModelPrice, encoder_cost_usd
from docroute.schemas.spec import OpenAICompatibleEncoderSpec, VllmEncoderSpec

SERVER_KEY = "docroute-test-server-key-42"
"""The key the test server accepts."""
WRONG_KEY = "sk-test-secret-123456"
"""A key the server rejects: it must never appear in an error."""
MODEL = "gemma-270m"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def embeddings_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` with embeddings on (mean pooled) and a bearer key, on 127.0.0.1."""
    port = _free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", "512", "--model_alias", MODEL, "--embedding", "True",
        "--kv_overrides", "gemma3.pooling_type=int:1", "--api_key", SERVER_KEY, "--n_threads", "2",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("embeddings-server") / "server.log"
    log = log_path.open("wb")  # a file, not a pipe: llama.cpp logs enough to fill a pipe and block the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                headers = {"Authorization": f"Bearer {SERVER_KEY}"}
                if httpx.get(f"{base_url}/models", headers=headers, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        else:
            raise RuntimeError("llama_cpp.server did not start in 120 s")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _spec(base_url: str, **overrides: Any) -> OpenAICompatibleEncoderSpec:
    values: dict[str, Any] = {
        "model": MODEL, "base_url": base_url, "api_key": SERVER_KEY, "timeout_s": 60, "max_retries": 0,
    }  # fmt: skip
    return OpenAICompatibleEncoderSpec(**(values | overrides))


def _server_usage(base_url: str, texts: list[str]) -> tuple[int, np.ndarray]:
    """The server's own answer for one request, sent without the encoder: (usage.prompt_tokens, raw vectors)."""
    response = httpx.post(
        f"{base_url}/embeddings",
        json={"model": MODEL, "input": texts},
        headers={"Authorization": f"Bearer {SERVER_KEY}"},
        timeout=60,
    )
    response.raise_for_status()
    body = response.json()
    return int(body["usage"]["prompt_tokens"]), np.asarray([d["embedding"] for d in body["data"]], dtype=np.float32)


SIMILAR = ("My card has not arrived yet.", "I am still waiting for my new card to be delivered.")
UNRELATED = "Simmer the tomato sauce with garlic for twenty minutes."


# ----------------------------------------------------------------------------------------------------------
# the OpenAI-compatible encoder against a real server


def test_vectors_are_normalised_deterministic_and_meaningful(embeddings_server: str) -> None:
    with OpenAICompatibleEncoder(_spec(embeddings_server)) as encoder:
        assert encoder.name == f"openai_compatible:{MODEL}"
        first = encoder.encode([*SIMILAR, UNRELATED])
        again = encoder.embed([*SIMILAR, UNRELATED])
    assert first.vectors.shape == (3, 640) and first.vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(first.vectors, axis=1), 1.0, atol=1e-5)
    assert np.allclose(first.vectors, again, atol=1e-5)
    similar, unrelated = float(first.vectors[0] @ first.vectors[1]), float(first.vectors[0] @ first.vectors[2])
    assert similar > unrelated, (similar, unrelated)
    _, raw = _server_usage(embeddings_server, [*SIMILAR, UNRELATED])  # the same vectors, only normalised
    assert np.allclose(first.vectors, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)
    assert first.seconds > 0 and first.limit == 512


def test_batches_keep_order_and_tokens_add_up_to_the_servers_usage(embeddings_server: str) -> None:
    texts = ["one", "the second text is a little longer", "three", "", "four four four four", "five"]
    sent = [t for t in texts if t]
    with OpenAICompatibleEncoder(_spec(embeddings_server, batch_size=2, max_concurrency=2)) as encoder:
        batched = encoder.encode(texts)
    assert isinstance(batched, MeteredEncoded)
    whole_usage, raw = _server_usage(embeddings_server, sent)  # one request holding every text
    rows = [i for i, t in enumerate(texts) if t]
    # llama.cpp's sums differ in the last digits with how a request's texts share a decode: same vectors, same order
    cosines = batched.vectors[rows] @ (raw / np.linalg.norm(raw, axis=1, keepdims=True)).T
    assert np.all(np.diag(cosines) > 0.999) and list(cosines.argmax(axis=1)) == list(range(len(sent)))
    assert sum(batched.input_tokens) == whole_usage  # what three requests billed, row by row
    for start in range(0, len(sent), 2):  # ... and each request's rows add up to that request's usage
        usage, _ = _server_usage(embeddings_server, sent[start : start + 2])
        assert sum(batched.input_tokens[rows[k]] for k in range(start, min(start + 2, len(sent)))) == usage
    assert batched.input_tokens[3] == 0 and not batched.vectors[3].any()
    assert batched.input_tokens[1] > batched.input_tokens[0]  # shared by length
    assert batched.tokens == batched.input_tokens and not any(batched.truncated)


def test_one_text_per_request_bills_each_text_exactly(embeddings_server: str) -> None:
    texts = ["hello world", "a somewhat longer sentence about invoices and dates"]
    with OpenAICompatibleEncoder(_spec(embeddings_server, batch_size=1)) as encoder:
        encoded = encoder.encode(texts)
    assert encoded.input_tokens == [_server_usage(embeddings_server, [t])[0] for t in texts]


def test_blank_texts_are_zero_rows_and_never_sent(embeddings_server: str) -> None:
    with OpenAICompatibleEncoder(_spec(embeddings_server)) as encoder:
        encoded = encoder.encode(["", "   \n", "hello"])
        only_blank = encoder.encode(["", " "])
        nothing = encoder.encode([])
    assert not encoded.vectors[:2].any() and encoded.input_tokens[:2] == [0, 0] and encoded.tokens[:2] == [0, 0]
    assert np.linalg.norm(encoded.vectors[2]) == pytest.approx(1.0, abs=1e-5)
    assert encoded.input_tokens[2] == _server_usage(embeddings_server, ["hello"])[0]  # "hello" went alone
    assert only_blank.vectors.shape == (2, 640) and not only_blank.vectors.any()
    assert nothing.vectors.shape == (0, 640) and nothing.tokens == []


def test_long_texts_are_cut_by_characters_and_marked(embeddings_server: str) -> None:
    long_text = " ".join(["invoice"] * 200)  # 1599 characters, about 200 tokens
    with OpenAICompatibleEncoder(_spec(embeddings_server, max_input_tokens=16)) as encoder:
        encoded = encoder.encode([long_text, "short text"])
    assert encoded.truncated == [True, False] and encoded.limit == 16
    billed, _ = _server_usage(embeddings_server, [long_text[:64].rsplit(" ", 1)[0], "short text"])
    assert sum(encoded.input_tokens) == billed  # the cut text was sent cut: ~64 characters
    assert row_usage(encoded, 0) == (encoded.input_tokens[0], True)
    assert row_usage(encoded, 1) == (encoded.input_tokens[1], False)
    assert encoded.tokens[0] > encoded.limit  # readers of the plain Encoded fields also see the cut


def test_dim_is_read_from_the_server_once(embeddings_server: str) -> None:
    with OpenAICompatibleEncoder(_spec(embeddings_server)) as encoder:
        assert encoder.dim == 640
        assert encoder.dim == 640


def test_requests_in_flight_stay_within_max_concurrency(embeddings_server: str) -> None:
    encoder = OpenAICompatibleEncoder(_spec(embeddings_server, batch_size=1, max_concurrency=2))
    real_request = encoder._request
    in_flight, peak, lock = 0, 0, threading.Lock()

    def counted(texts: list[str]) -> tuple[np.ndarray, int]:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        try:
            return real_request(texts)  # the real server answers; this only counts
        finally:
            with lock:
                in_flight -= 1

    encoder._request = counted  # type: ignore[method-assign]
    results: list[Encoded] = []

    def call(i: int) -> None:
        results.append(encoder.encode([f"text {i}", f"other {i}", f"more {i}"]))

    callers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    try:
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join(timeout=120)
    finally:
        encoder.close()
    assert len(results) == 2 and all(r.vectors.shape == (3, 640) for r in results)
    assert 1 <= peak <= 2  # one pool for every calling thread


def test_a_rejected_key_is_a_clear_error_without_the_key(embeddings_server: str) -> None:
    encoder = OpenAICompatibleEncoder(_spec(embeddings_server, api_key=WRONG_KEY))
    with encoder, pytest.raises(EmbeddingsRequestError) as caught:
        encoder.encode(["hello"])
    error = caught.value
    assert isinstance(error, EngineError) and error.status == 401 and not error.retryable
    assert "401" in str(error) and "api_key" in str(error) and embeddings_server in str(error)
    _assert_no_secret(error, WRONG_KEY)


def test_a_missing_endpoint_is_a_clear_error(embeddings_server: str) -> None:
    """A 404 (llama-cpp-python serves its one model under any name, so a wrong path stands in for a wrong model)."""
    wrong = embeddings_server.removesuffix("/v1") + "/no-such-api"
    encoder = OpenAICompatibleEncoder(_spec(wrong, api_key=WRONG_KEY))
    with encoder, pytest.raises(EmbeddingsRequestError, match=re.escape(f"serve model {MODEL}")) as caught:
        encoder.encode(["hello"])
    assert caught.value.status == 404 and not caught.value.retryable
    _assert_no_secret(caught.value, WRONG_KEY)


def test_a_server_that_is_down_is_a_clear_retryable_error() -> None:
    base_url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    encoder = OpenAICompatibleEncoder(_spec(base_url, api_key=WRONG_KEY, timeout_s=5))
    with encoder, pytest.raises(EmbeddingsRequestError, match="APIConnectionError") as caught:
        encoder.encode(["hello", "world"])
    assert caught.value.retryable and caught.value.status is None and base_url in str(caught.value)
    _assert_no_secret(caught.value, WRONG_KEY)


def test_a_server_that_ignores_dimensions_is_caught(embeddings_server: str) -> None:
    with OpenAICompatibleEncoder(_spec(embeddings_server, dimensions=64)) as encoder:
        assert encoder.name == f"openai_compatible:{MODEL}@64" and encoder.dim == 64
        with pytest.raises(EmbeddingsResponseError, match="640-dimension vectors for dimensions=64"):
            encoder.encode(["hello"])


def _assert_no_secret(error: BaseException, secret: str) -> None:
    texts = [str(error), repr(error), *map(str, error.args)]
    assert not any(secret in text or secret[3:15] in text for text in texts), texts
    assert error.__cause__ is None and error.__suppress_context__  # the SDK's exception is not chained


# ----------------------------------------------------------------------------------------------------------
# the OpenAI-compatible encoder without a server


def test_openai_proper_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    spec = OpenAICompatibleEncoderSpec(model="text-embedding-3-small")
    with pytest.raises(EngineUnavailableError, match="OPENAI_API_KEY"):
        OpenAICompatibleEncoder(spec)
    monkeypatch.setenv("OPENAI_API_KEY", WRONG_KEY)
    encoder = OpenAICompatibleEncoder(spec)  # no request is sent to build it or to read its width
    assert encoder.dim == 1536 and WRONG_KEY not in repr(encoder)
    large = OpenAICompatibleEncoderSpec(model="text-embedding-3-large")
    assert OpenAICompatibleEncoder(large).dim == 3072
    assert OpenAICompatibleEncoder(large.model_copy(update={"dimensions": 256})).dim == 256


def test_apportioned_tokens_add_up_and_follow_length() -> None:
    assert apportion_tokens(10, [1, 1, 1]) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert sum(apportion_tokens(10, [1, 1, 1])) == 10
    assert apportion_tokens(100, [10, 30, 60]) == [10, 30, 60]
    assert apportion_tokens(7, [0, 0]) in ([4, 3], [3, 4])
    assert apportion_tokens(0, [5, 5]) == [0, 0] and apportion_tokens(5, []) == []
    shares = apportion_tokens(1001, [3, 7, 11, 13, 17])
    assert sum(shares) == 1001 and shares == sorted(shares)


def test_row_usage_of_a_plain_encoded_reads_the_limit() -> None:
    plain = Encoded(np.zeros((2, 4), dtype=np.float32), [10, 900], 512, 0.1)
    assert row_usage(plain, 0) == (10, False) and row_usage(plain, 1) == (512, True)


def test_encoder_cost_prices_input_tokens_only() -> None:
    assert encoder_cost_usd(None, 1_000_000) == 0.0  # self-hosted
    assert encoder_cost_usd(DEFAULT_PRICES["text-embedding-3-small"], 1_000_000) == pytest.approx(0.02)
    assert encoder_cost_usd(DEFAULT_PRICES["text-embedding-3-large"], 1000) == pytest.approx(0.00013)
    assert encoder_cost_usd(DEFAULT_PRICES["text-embedding-ada-002"], 2_500_000) == pytest.approx(0.25)
    assert encoder_cost_usd(ModelPrice(input_per_million=1.0, output_per_million=50.0), 10) == pytest.approx(1e-5)
    assert encoder_cost_usd(DEFAULT_PRICES["text-embedding-3-small"], -5) == 0.0
    self_hosted = OpenAICompatibleEncoderSpec(model="anything", base_url="http://127.0.0.1:1/v1")
    assert encoder_cost_usd(self_hosted.unit_price, 10_000) == 0.0


# ----------------------------------------------------------------------------------------------------------
# vLLM without a GPU


def _vllm_spec(**overrides: Any) -> VllmEncoderSpec:
    return VllmEncoderSpec(**({"model": "BAAI/bge-small-en-v1.5"} | overrides))


def test_llm_arguments_pick_the_pooling_runner() -> None:
    spec = _vllm_spec(max_model_len=512, dtype="float16")
    assert vllm_encoder_llm_kwargs(spec, {"runner", "model"}) == {
        "model": "BAAI/bge-small-en-v1.5", "dtype": "float16", "gpu_memory_utilization": 0.2,
        "runner": "pooling", "max_model_len": 512,
    }  # fmt: skip
    older = vllm_encoder_llm_kwargs(_vllm_spec(), {"task", "model"})  # vLLM before the runner option
    assert older["task"] == "embed" and "runner" not in older and "max_model_len" not in older


def test_the_runtime_passes_those_arguments_to_vllm_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for the `LLM` class records its arguments and refuses to load: nothing here embeds."""
    recorded: list[dict[str, Any]] = []

    @dataclasses.dataclass
    class EngineArgs:  # vLLM >= 0.10's field that matters here
        model: str = ""
        runner: str = "auto"

    class RecordingLLM:
        def __init__(self, **kwargs: Any) -> None:
            recorded.append(kwargs)
            raise RuntimeError("stand-in: no model is loaded in this test")

    fake = ModuleType("vllm")
    fake.EngineArgs = EngineArgs  # type: ignore[attr-defined]
    fake.LLM = RecordingLLM  # type: ignore[attr-defined]
    monkeypatch.setattr(remote_encoders, "require_gpu", lambda tensor_parallel_size=1: None)
    spec = _vllm_spec(model="org/some-embedder", gpu_memory_utilization=0.3)
    with pytest.raises(EngineUnavailableError, match="could not load embedding model org/some-embedder"):
        remote_encoders.VllmEmbeddingRuntime(spec, fake)
    assert recorded == [
        {"model": "org/some-embedder", "dtype": "auto", "gpu_memory_utilization": 0.3, "runner": "pooling"}
    ]


def test_missing_vllm_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_vllm(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_vllm)
    monkeypatch.setattr(remote_encoders, "_VLLM_RUNTIMES", {})
    with pytest.raises(EngineUnavailableError, match=re.escape(INSTALL_HINT)):
        VllmEncoder(_vllm_spec(model="any/model-not-loaded"))


def test_real_engine_args_accept_the_arguments() -> None:
    vllm = pytest.importorskip("vllm", reason="vllm is not installed here (CI's vLLM side environment has it)")
    names = engine_arg_names(vllm)
    kwargs = vllm_encoder_llm_kwargs(_vllm_spec(max_model_len=512), names)
    assert kwargs["runner"] == "pooling"  # every vLLM docroute supports (>= 0.12) has the pooling runner
    args = vllm.EngineArgs(**kwargs)  # a dataclass: checks names and stores values, loads nothing
    assert (args.model, args.runner, args.max_model_len) == ("BAAI/bge-small-en-v1.5", "pooling", 512)


def test_real_embedding_outputs_become_normalised_rows() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed here (CI's vLLM side environment has it)")
    torch = pytest.importorskip("torch", reason="torch is not installed here")
    from vllm.outputs import EmbeddingOutput, EmbeddingRequestOutput, PoolingOutput, PoolingRequestOutput

    def embedding(request_id: str, vector: list[float], ids: list[int]) -> Any:
        return EmbeddingRequestOutput(request_id, EmbeddingOutput(vector), ids, 0, True)

    sent = [[101, 7, 8, 102], [101, 9, 102]]
    outputs = [embedding("0", [3.0, 4.0, 0.0], sent[0]), embedding("1", [0.0, 0.0, 2.0], sent[1])]
    vectors, read = read_embedding_outputs(outputs, sent)
    assert vectors.dtype == np.float32 and np.allclose(vectors, [[0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])
    assert read == [4, 3]

    pooled = PoolingRequestOutput("p", PoolingOutput(torch.tensor([1.0, 1.0], dtype=torch.bfloat16)), [5, 6], 0, True)
    vectors, read = read_embedding_outputs([pooled], [[5, 6]])  # what LLM.encode returns: a tensor
    assert np.allclose(vectors, [[2**-0.5, 2**-0.5]]) and read == [2]
    converted = EmbeddingRequestOutput.from_base(pooled)  # how LLM.embed makes its outputs
    assert np.allclose(read_embedding_outputs([converted], [[5, 6]])[0], vectors)

    with pytest.raises(EngineError, match="read 4 tokens of a text sent as 3"):
        read_embedding_outputs([outputs[0]], [sent[1]])
    with pytest.raises(EngineError, match="2 embeddings for 1 texts"):
        read_embedding_outputs(outputs, sent[:1])
    with pytest.raises(EngineError, match="3 and 2 dimensions"):
        read_embedding_outputs([outputs[0], embedding("2", [1.0, 0.0], [1])], [sent[0], [1]])
    tokens = PoolingRequestOutput("t", PoolingOutput(torch.ones(3, 2)), [1, 2, 3], 0, True)  # token_embed
    with pytest.raises(EngineError, match="not a single-vector embed"):
        read_embedding_outputs([tokens], [[1, 2, 3]])


def test_a_failed_vllm_request_is_an_error_not_a_vector() -> None:
    pytest.importorskip("vllm", reason="vllm is not installed here (CI's vLLM side environment has it)")
    from vllm import outputs as vllm_outputs

    if not hasattr(vllm_outputs, "RequestError"):
        pytest.skip("this vLLM has no request-level errors on outputs")
    failed = vllm_outputs.EmbeddingRequestOutput(
        "x", vllm_outputs.EmbeddingOutput([]), [1, 2], 0, True,
        error=vllm_outputs.RequestError(code="validation_error", message="prompt too long"),
    )  # fmt: skip
    with pytest.raises(EngineError, match="prompt too long"):
        read_embedding_outputs([failed], [[1, 2]])


def test_tokenization_counts_every_token_and_cuts_like_vllm(tmp_path: Path) -> None:
    """A real Hugging Face tokenizer (a WordPiece vocabulary written here): [CLS] and [SEP] stay on a cut text."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
    words = ["the", "card", "has", "not", "arrived", "yet", "sauce"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(vocab))
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    ids, counts = tokenize_for_embedding(tokenizer, ["the card has not arrived yet", "sauce"], limit=5)
    assert counts == [8, 3]  # 6 words + [CLS] + [SEP]: the whole text, not what was kept
    assert len(ids[0]) == 5 and ids[0][0] == cls_id and ids[0][-1] == sep_id  # the first words, specials kept
    assert ids[0][1:4] == tokenizer.convert_tokens_to_ids(["the", "card", "has"])
    assert ids[1] == [cls_id, tokenizer.convert_tokens_to_ids("sauce"), sep_id]
    assert tokenize_for_embedding(tokenizer, [], limit=5) == ([], [])


# ----------------------------------------------------------------------------------------------------------
# vLLM on a GPU


def _gpu_skip_reason() -> str | None:
    try:
        import torch
        import vllm  # noqa: F401
    except Exception as exc:  # an import failure of any kind means: not here
        return f"needs vllm and torch ({exc})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))
def test_vllm_encoder_on_a_gpu() -> None:
    """A small embedding model (DOCROUTE_VLLM_TEST_EMBED_MODEL: an HF id or a local path) under the pooling runner."""
    model = os.environ.get("DOCROUTE_VLLM_TEST_EMBED_MODEL", "BAAI/bge-small-en-v1.5")
    spec = VllmEncoderSpec(model=model, max_input_tokens=16, gpu_memory_utilization=0.2)
    try:
        encoder = VllmEncoder(spec)
    except EngineUnavailableError as exc:
        pytest.skip(f"cannot load {model} here: {exc}")
    long_text = " ".join(["invoice"] * 100)
    encoded = encoder.encode([*SIMILAR, UNRELATED, "", long_text])
    assert encoder.name == f"vllm:{model}" and encoded.vectors.shape == (5, encoder.dim)
    assert np.allclose(np.linalg.norm(encoded.vectors[[0, 1, 2, 4]], axis=1), 1.0, atol=1e-4)
    assert not encoded.vectors[3].any() and encoded.tokens[3] == 0
    tokenizer = encoder._runtime.tokenizer
    assert encoded.tokens[0] == len(tokenizer.encode(SIMILAR[0]))  # exact, special tokens included
    assert encoded.tokens[4] > encoded.limit == 16  # the long text was cut to 16 tokens
    similar, unrelated = float(encoded.vectors[0] @ encoded.vectors[1]), float(encoded.vectors[0] @ encoded.vectors[2])
    assert similar > unrelated
    assert np.allclose(encoder.embed([SIMILAR[0]]), encoded.vectors[:1], atol=1e-3)
