"""/health over the real services: 200 only when a request would be served."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from shared.storage.local import LocalStore
from tests.harness import backend, stack_settings


async def test_health_is_503_with_the_reason_until_every_service_answers(
    nats_url: str, tmp_path: Path
) -> None:
    settings = stack_settings(nats_url, tmp_path)
    async with (
        LocalStore(settings.store) as store,
        backend(settings, store, ("gateway", "merger", "loader")) as be,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(f"{be.url}/health") as resp:
            body = await resp.json()
        assert resp.status == 503 and "compute" in body["reason"], body
        assert "loader" not in body["reason"] and "merger" not in body["reason"]
