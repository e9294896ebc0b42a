"""Faults the storage side can meet, each with the outcome a user is promised: the answer
computing alone gives, within a bound, nothing wrong stored."""

from __future__ import annotations

import errno
import uuid
from pathlib import Path

import pytest

from bench.s3_server import moto_s3_server
from services.loader.service import Loader
from shared.storage.s3 import S3Store
from shared.storage.staging import Staging
from tests.harness import backend, stack_settings
from tests.prom import value
from tests.test_pipeline import prompt


async def test_an_s3_server_gone_mid_life_means_computing(
    nats_url: str,
    tmp_path: Path,
    s3_endpoint: str,  # (s3_endpoint: the fake credentials)
) -> None:
    """Chunks stored on an S3 server that then stops: lookups and reads fail (bounded by the
    store's timeouts, the RPC and fetch timeouts), the request computes everything, and the
    answer is the same."""
    tokens = prompt(500, seed=70)
    bucket = "cake-" + uuid.uuid4().hex[:12]
    settings = stack_settings(
        nats_url, tmp_path, store=f"s3://{bucket}/kv", rpc_timeout_s=1.0, fetch_timeout_s=1.0
    )

    def s3(endpoint: str) -> S3Store:
        return S3Store(bucket, "kv/", endpoint_url=endpoint, connect_timeout_s=0.5,
                       read_timeout_s=1.0, max_attempts=1)  # fmt: skip

    with moto_s3_server() as endpoint:
        async with s3(endpoint) as store:
            await store.ensure_bucket()
            async with backend(settings, store) as be:
                ref = await be.generate(tokens, kv_mode="compute")  # and stored
                assert (await be.generate(tokens, kv_mode="load")).done.chunks_loaded == 7
    async with s3(endpoint) as gone, backend(settings, gone) as be:  # its server has stopped
        for kv_mode in ("cake", "load"):
            res = await be.generate(tokens, kv_mode=kv_mode)
            assert res.tokens == ref.tokens
            assert res.done.chunks_loaded == 0
            assert res.elapsed_s < 10


async def test_a_full_staging_area_means_computing(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No room left in staging (ENOSPC on every staged chunk): the loads fail and are counted
    (once one failed, the chunks below it are the head's to compute and are not read), compute
    takes those chunks, the answer is the same, and no staged file is left behind."""
    from shared.storage.local import LocalStore

    tokens = prompt(500, seed=71)
    settings = stack_settings(nats_url, tmp_path, fetch_timeout_s=1.0)
    async with LocalStore(settings.store) as store, backend(settings, store) as be:
        ref = await be.generate(tokens, kv_mode="compute")  # and stored

        def full(self: Staging, request_id: str, name: str) -> object:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root))

        monkeypatch.setattr(Staging, "incoming", full)
        for kv_mode in ("cake", "load"):
            res = await be.generate(tokens, kv_mode=kv_mode)
            assert res.tokens == ref.tokens
            assert res.done.chunks_loaded == 0
            assert res.elapsed_s < 10
        loader = be.services["loader"]
        assert isinstance(loader, Loader)
        failures = value(loader.metrics.registry, "cake_load_failures_total")
        assert 2 <= failures < 2 * 7  # each request's failed, and none read below a failure
        assert not [p for p in Path(settings.staging_dir).rglob("*") if p.is_file()]
