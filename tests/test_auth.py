"""API keys and tenants: 401 without a key, /health and /metrics open, one cache space per
tenant (server-side, whatever cache_salt a client sends), keys from a file or `cake up`."""

from __future__ import annotations

import random
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.launcher.cli import build_parser, settings_from_args
from services.launcher.stack import SERVICES
from shared.core.errors import ConfigError
from shared.core.keys import tenant_salt
from shared.runtime.config import Settings
from shared.storage.local import LocalStore
from tests.harness import Backend, backend, stack_settings

KEYS = "key-a1:alpha, key-a2:alpha, key-b:beta, key-solo"


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


def test_keys_parse_from_entries_and_files(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team keys\nkey-c:gamma  # ops\nkey-d:gamma, key-e\n")
    tenants = Settings(api_keys=f"{KEYS},@{keys_file}").api_key_tenants()
    assert {k: v for k, v in tenants.items() if k != "key-solo" and k != "key-e"} == {
        "key-a1": "alpha", "key-a2": "alpha", "key-b": "beta", "key-c": "gamma", "key-d": "gamma",
    }  # fmt: skip
    assert tenants["key-solo"].startswith("key-") and tenants["key-solo"] != tenants["key-e"]
    assert Settings().api_key_tenants() == {}
    for bad in ("key:", ":tenant", f"@{tmp_path / 'missing'}"):
        with pytest.raises(ConfigError, match="CAKE_API_KEYS"):
            Settings(api_keys=bad).api_key_tenants()
    assert "key-a1" not in repr(Settings(api_keys=KEYS, kv_secret="s"))  # secrets stay out of logs


def test_cake_up_api_key_flags_add_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAKE_API_KEYS", "from-env:alpha")
    args = build_parser().parse_args(["up", "--api-key", "k1", "--api-key", "k2:beta"])
    tenants = settings_from_args(args).api_key_tenants()
    assert set(tenants) == {"from-env", "k1", "k2"} and tenants["k2"] == "beta"


def test_tenant_salts_cannot_be_forged_with_a_cache_salt() -> None:
    """With keys every request has a tenant, so no cache_salt of beta's names alpha's space."""
    assert tenant_salt("", "s") == "s"  # no keys: the cache_salt alone, as before
    alpha = tenant_salt("alpha", "s")
    for forged in ("s", alpha, '","alpha","s', 'alpha","s'):
        assert tenant_salt("beta", forged) != alpha


@pytest.fixture
async def keyed(nats_url: str, tmp_path: Path) -> AsyncIterator[Backend]:
    settings = stack_settings(nats_url, tmp_path, api_keys=KEYS)
    async with LocalStore(settings.store) as store, backend(settings, store, SERVICES) as be:
        yield be


async def post(
    session: aiohttp.ClientSession, be: Backend, key: str | None, **body: Any
) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "default", "max_tokens": 2, "temperature": 0, **body}
    async with session.post(f"{be.url}/v1/completions", json=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_requests_need_a_known_key_except_health_and_metrics(keyed: Backend) -> None:
    async with aiohttp.ClientSession() as session:
        for key in (None, "wrong", "key-a1x"):
            status, body = await post(session, keyed, key, prompt="hi")
            assert status == 401 and body["error"]["code"] == "invalid_api_key", key
            assert body["error"]["type"] == "invalid_request_error"
        async with session.get(f"{keyed.url}/v1/models") as resp:
            assert resp.status == 401
        async with session.get(
            f"{keyed.url}/v1/models", headers={"Authorization": "Basic key-b"}
        ) as resp:
            assert resp.status == 401  # the bearer scheme only
        for path in ("/health", "/metrics"):
            async with session.get(f"{keyed.url}{path}") as resp:
                assert resp.status == 200, path
                metrics = await resp.text()
        assert 'cake_errors_total{kind="invalid_api_key"} 5.0' in metrics
        status, body = await post(session, keyed, "key-solo", prompt="hi")
        assert status == 200 and body["usage"]["completion_tokens"] == 2


async def test_tenants_never_see_each_others_prefixes(keyed: Backend) -> None:
    prompt = text(500, seed=1)  # 7 usable chunks of 64
    async with aiohttp.ClientSession() as session:
        status, first = await post(session, keyed, "key-a1", prompt=prompt, cache_salt="s")
        assert status == 200 and first["cake"]["hit_tokens"] == 0
        # beta sends alpha's prompt with alpha's cache_salt: nothing of alpha's is found
        status, other = await post(
            session, keyed, "key-b", prompt=prompt, cache_salt="s", kv_mode="load"
        )
        assert other["cake"]["hit_tokens"] == 0
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert other["choices"][0]["text"] == first["choices"][0]["text"]
        # another key of alpha's shares alpha's space
        status, same = await post(
            session, keyed, "key-a2", prompt=prompt, cache_salt="s", kv_mode="load"
        )
        assert same["cake"]["hit_tokens"] == 7 * 64
        assert same["usage"]["prompt_tokens_details"]["cached_tokens"] == 7 * 64


async def test_a_cache_salt_cannot_name_a_tenants_space(nats_url: str, tmp_path: Path) -> None:
    """Without keys the salt is the client's, so one that looks like a tenant's is refused."""
    settings = stack_settings(nats_url, tmp_path)
    async with (
        LocalStore(settings.store) as store,
        backend(settings, store, ("gateway",)) as be,
        aiohttp.ClientSession() as session,
    ):
        status, body = await post(session, be, None, prompt="hi", cache_salt=tenant_salt("a", ""))
    assert status == 400 and body["error"]["param"] == "cache_salt"
