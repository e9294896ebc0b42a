"""Shared pytest fixtures, one section per external service."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from bench.s3_server import FAKE_AWS_ENV, moto_s3_server
from services.launcher.nats_server import NatsServer

# --- S3 (moto) ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server for the session, with fake AWS credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("AWS_PROFILE", raising=False)
        for name, value in FAKE_AWS_ENV.items():
            mp.setenv(name, value)
        with moto_s3_server() as url:
            yield url


# --- NATS -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    """NATS_URL when set, else a real nats-server started on a free port for this session."""
    if os.environ.get("NATS_URL"):
        yield os.environ["NATS_URL"]
        return
    server = NatsServer.start()
    try:
        yield server.url
    finally:
        server.stop()
