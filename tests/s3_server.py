"""moto's S3 server on 127.0.0.1 for the tests: real HTTP, real s3fs, no AWS."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

KEY, SECRET = "AKIAMOTOTESTKEY", "moto-secret-that-must-never-leak"


@contextmanager
def moto_server() -> Iterator[str]:
    """Start moto's threaded server on a free port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def s3_filesystem(endpoint: str) -> Any:
    import s3fs

    return s3fs.S3FileSystem(
        key=KEY, secret=SECRET, endpoint_url=endpoint, client_kwargs={"region_name": "us-east-1"},
        skip_instance_cache=True,
    )  # fmt: skip


def make_bucket(endpoint: str, name: str) -> Any:
    """Create a bucket; returns an s3fs filesystem on the server."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1"
    )
    client.create_bucket(Bucket=name)
    return s3_filesystem(endpoint)


def s3_access_yaml(endpoint: str) -> str:
    """The `s3:` block of a job's source or output for this server (two-space indent)."""
    return f"  s3: {{endpoint_url: '{endpoint}', region: us-east-1, key: {KEY}, secret: {SECRET}}}\n"
