"""The OpenAI-compatible engine against a REAL server: llama-cpp-python's, serving the packaged Gemma 3 270M."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import httpx
import pytest

from docroute.engines.base import Request
from docroute.engines.remote.openai_compat import engine_from_small_spec
from docroute.schemas.spec import (
    ClassifySpec,
    ExtractSpec,
    FieldSpec,
    LabelSpec,
    OpenAICompatibleSmallSpec,
    TaskSpec,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `python -m llama_cpp.server` on 127.0.0.1; logits_all is what its logprobs need."""
    port = _free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", "1024", "--model_alias", "gemma-270m", "--logits_all", "True",
        "--n_threads", "2",
    ]  # fmt: skip
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    log = log_path.open("wb")  # a file, not a pipe: llama.cpp logs enough to fill a pipe and block the server
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited: {log_path.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{base_url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise RuntimeError("llama_cpp.server did not start in 120 s")
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _spec(base_url: str) -> OpenAICompatibleSmallSpec:
    return OpenAICompatibleSmallSpec(
        model="gemma-270m", base_url=base_url, server="llamacpp", max_output_tokens=40, max_concurrency=1,
        timeout_s=120, max_retries=0,
    )  # fmt: skip


def test_structured_classification_with_logprobs_and_usage(llama_server: str) -> None:
    task = TaskSpec(
        classify=ClassifySpec(
            labels=[LabelSpec(name="sports", description="games"), LabelSpec(name="weather", description="forecasts")]
        )
    )
    engine = engine_from_small_spec(_spec(llama_server), task)
    try:
        predictions = engine.predict([Request("a", "The striker scored twice in the final."), Request("b", "Rain.")])
    finally:
        engine.close()
    assert [p.id for p in predictions] == ["a", "b"]
    for prediction in predictions:
        assert prediction.ok, prediction.error
        assert prediction.label in ("sports", "weather")  # the server's grammar enforced the schema
        assert prediction.label_confidence is not None and 0 < prediction.label_confidence <= 1
        assert prediction.usage.input_tokens > 20 and prediction.usage.output_tokens > 0
        assert prediction.model == "openai_compatible:gemma-270m"


def test_structured_extraction_is_typed(llama_server: str) -> None:
    task = TaskSpec(extract=ExtractSpec(fields=[FieldSpec(name="invoice_date", type="date", required=False)]))
    engine = engine_from_small_spec(_spec(llama_server), task)
    try:
        (prediction,) = engine.predict([Request("inv", "Invoice NW-1\nDate: 2024-03-14\nTotal: $351.27")])
    finally:
        engine.close()
    assert prediction.ok, prediction.error
    value = prediction.fields["invoice_date"]
    assert value is None or isinstance(value, date)  # a 270M base model may well not find it; the type holds
    assert set(prediction.field_confidences) == {"invoice_date"}
    assert prediction.usage.output_tokens > 0
