"""The embedded nats-server's roles: each service's user reaches only its subjects; anonymous
clients are refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from services.launcher.nats_auth import authorization, new_passwords, with_credentials
from services.launcher.nats_server import NatsServer
from shared.wire import subjects
from shared.wire.nats_connection import flushed, redacted


async def ignore(_: Exception) -> None:
    """The server's permission errors arrive here; the tests look at what was delivered."""


@pytest.fixture
async def roles() -> AsyncIterator[tuple[str, dict[str, Client]]]:
    """The server's URL (no credentials) and a client per service role."""
    passwords = new_passwords()
    server = NatsServer.start(authorization=authorization(passwords))
    clients: dict[str, Client] = {}
    try:
        for role in ("gateway", "merger", "compute", "loader"):
            url = with_credentials(server.url, role, passwords[role])
            clients[role] = await nats.connect(
                url,
                allow_reconnect=False,
                error_cb=ignore,
                inbox_prefix=subjects.inbox_prefix(role),
            )
        yield server.url, clients
    finally:
        for client in clients.values():
            await client.close()
        server.stop()


async def received(client: Client, subject: str, queue: str = "") -> list[Msg]:
    got: list[Msg] = []

    async def on(msg: Msg) -> None:
        got.append(msg)

    await client.subscribe(subject, queue=queue, cb=on)
    await flushed(client)
    return got


async def test_roles_reach_only_their_subjects(roles: tuple[str, dict[str, Client]]) -> None:
    url, clients = roles
    with pytest.raises(Exception):  # noqa: B017 (nats-py raises its own error kinds)
        await nats.connect(url, allow_reconnect=False, connect_timeout=2, error_cb=ignore)
    # only compute may take prefill jobs: the gateway cannot join its queue group
    compute_jobs = await received(clients["compute"], subjects.COMPUTE_PREFILL, "compute")
    gateway_jobs = await received(clients["gateway"], subjects.COMPUTE_PREFILL, "compute")
    # only compute and the merger may publish on a request's stream
    stream = subjects.stream("r1")
    seen = await received(clients["gateway"], stream)
    for _ in range(100):  # the allowed messages, until they arrive (a busy machine is slow)
        await clients["merger"].publish(subjects.COMPUTE_PREFILL, b"job")
        await clients["compute"].publish(stream, b"tokens")
        await flushed(clients["merger"])
        await flushed(clients["compute"])
        await asyncio.sleep(0.05)
        if len(compute_jobs) >= 4 and seen:
            break
    before = len(seen)
    await clients["loader"].publish(stream, b"forged tokens")
    await clients["gateway"].publish(stream, b"forged tokens")
    await flushed(clients["loader"])
    await flushed(clients["gateway"])
    await clients["compute"].publish(stream, b"tokens")  # after the forged ones, in order
    await flushed(clients["compute"])
    for _ in range(100):  # the last allowed one arrives after any forged one would have
        if len(seen) > before:
            break
        await asyncio.sleep(0.05)
    assert len(compute_jobs) >= 4 and not gateway_jobs
    assert seen and {m.data for m in seen} == {b"tokens"}


async def test_only_the_merger_says_meet_and_replies_stay_with_their_role(
    roles: tuple[str, dict[str, Client]],
) -> None:
    """The gateway may Cancel a request but not send its Meet; no role reads another's replies."""
    _, clients = roles
    control, cancel = subjects.control("r2"), subjects.cancel("r2")
    meets = await received(clients["compute"], control)
    cancels = await received(clients["compute"], cancel)
    for _ in range(100):  # the allowed ones, until they arrive
        await clients["gateway"].publish(control, b"forged meet")
        await clients["gateway"].publish(cancel, b"cancel")
        await clients["merger"].publish(control, b"meet")
        for role in ("gateway", "merger"):
            await flushed(clients[role])
        await asyncio.sleep(0.05)
        if meets and cancels:
            break
    assert meets and {m.data for m in meets} == {b"meet"}
    assert cancels and {m.data for m in cancels} == {b"cancel"}
    spied = await received(clients["gateway"], f"{subjects.inbox_prefix('merger')}.>")

    async def answer(msg: Msg) -> None:
        await msg.respond(b"model info")

    await clients["compute"].subscribe(subjects.COMPUTE_INFO, cb=answer)
    await flushed(clients["compute"])
    reply = await clients["merger"].request(subjects.COMPUTE_INFO, b"", timeout=5)
    assert reply.data == b"model info" and reply.subject.startswith("_INBOX_merger.")
    await asyncio.sleep(0.2)
    assert not spied


def test_urls_with_credentials_are_redacted_in_messages() -> None:
    url = with_credentials("nats://127.0.0.1:4222", "compute", "s3cret")
    assert url == "nats://compute:s3cret@127.0.0.1:4222"
    assert redacted(url) == "nats://127.0.0.1:4222"


async def test_services_answer_discovery_and_observers_may_ask() -> None:
    """nats.micro discovery (what `nats micro ls` does): a service role answers $SRV.PING and
    $SRV.INFO as cake-<service> with its node; the observer role may ask."""
    import json

    from shared.wire.bus import Bus

    passwords = new_passwords()
    server = NatsServer.start(authorization=authorization(passwords))
    try:
        loader = await Bus.connect(with_credentials(server.url, "loader", passwords["loader"]), "t")
        stop = await loader.announce("cake-loader", {"node": "node-7"})
        observer = await nats.connect(
            with_credentials(server.url, "observer", passwords["observer"]),
            allow_reconnect=False, error_cb=ignore,
            inbox_prefix=subjects.inbox_prefix("observer"),
        )  # fmt: skip
        ping = json.loads((await observer.request("$SRV.PING.cake-loader", b"", 2.0)).data)
        info = json.loads((await observer.request("$SRV.INFO", b"", 2.0)).data)
        assert ping["name"] == info["name"] == "cake-loader"
        assert info["metadata"] == {"node": "node-7"} and ping["id"] == info["id"]
        await stop()
        with pytest.raises(nats.errors.NoRespondersError):
            await observer.request("$SRV.PING.cake-loader", b"", 1.0)
        await observer.close()
        await loader.close()
    finally:
        server.stop()
