"""Shared fixtures: one Prefect test server per session, the packaged model, and local corpora built on the fly."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

# no analytics leave the machine; set before Prefect is imported anywhere in the session
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests import helpers such as oracle_server directly


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """A real Prefect API (temporary database) for every flow test of the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The packaged Gemma 3 270M GGUF, assembled once from its PyPI chunks (no download)."""
    from docroute.engines.local.llama_runtime import packaged_model_path

    return packaged_model_path()


@pytest.fixture(scope="session")
def runtime(model_path: Path):
    """This process's shared llama.cpp runtime (the same one engines use)."""
    from docroute.engines.local.llama_runtime import shared_runtime

    return shared_runtime(model_path, n_ctx=2048, n_threads=None)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1, shared by the session's object-storage tests (each uses its own bucket)."""
    from s3_server import moto_server

    with moto_server() as endpoint:
        yield endpoint
