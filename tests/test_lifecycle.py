"""The service lifecycle: a fixed shutdown order, bounded drains, safe after a failed start."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import pytest

from shared.runtime import service as lifecycle
from shared.runtime.config import Settings
from shared.runtime.service import Service, running
from shared.wire.bus import Bus
from shared.wire.local import LocalBroker, LocalConnection
from shared.wire.messages import Accepted, Message

SETTINGS = Settings().validated()


class Recorder(Service):
    """A service that notes each lifecycle step in `log`."""

    name = "recorder"

    def __init__(self, bus: Bus, log: list[str], stuck: bool = False) -> None:
        super().__init__(bus, SETTINGS)
        self.log, self.stuck = log, stuck

    async def start(self) -> None:
        await self.bus.handle("test.lifecycle", self.on_message)
        self.loops.spawn(asyncio.sleep(3600))
        if self.stuck:
            self.tasks.spawn(self.never_ends())
        self.log.append("started")

    async def on_message(self, _: Message, __: str) -> Message:
        return Accepted()

    async def never_ends(self) -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            self.log.append("stuck task cancelled")

    async def stop_taking_work(self) -> None:
        await super().stop_taking_work()
        self.log.append("stopped taking work")

    async def drain(self) -> None:
        self.log.append("draining")
        await super().drain()


def connector(broker: LocalBroker, log: list[str]):  # type: ignore[no-untyped-def]
    async def connect() -> Bus:
        connection = LocalConnection(broker)
        close = connection.close

        async def logged_close(timeout_s: float) -> None:
            log.append("bus closed")
            await close(timeout_s)

        connection.close = logged_close  # type: ignore[method-assign]
        return Bus(connection)

    return connect


async def test_close_runs_in_a_fixed_order_and_once() -> None:
    log: list[str] = []

    async def build(bus: Bus, _: Settings, resources: AsyncExitStack) -> Service:
        resources.callback(log.append, "resources released")
        return Recorder(bus, log)

    async with running(build, SETTINGS, connector(LocalBroker(), log)) as service:
        assert log == ["started"]
    await service.close()  # again: nothing happens
    assert log == [
        "started", "stopped taking work", "draining", "resources released", "bus closed",
    ]  # fmt: skip


async def test_a_stuck_drain_is_bounded_and_its_tasks_are_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lifecycle, "DRAIN_TIMEOUT_S", 0.2)
    log: list[str] = []

    async def build(bus: Bus, _: Settings, __: AsyncExitStack) -> Service:
        return Recorder(bus, log, stuck=True)

    started = asyncio.get_running_loop().time()
    async with running(build, SETTINGS, connector(LocalBroker(), log)) as service:
        pass
    assert asyncio.get_running_loop().time() - started < 2
    assert "stuck task cancelled" in log and not len(service.tasks)


async def test_a_failed_start_still_closes_the_service_and_the_bus() -> None:
    log: list[str] = []

    class Broken(Recorder):
        async def start(self) -> None:
            await super().start()
            raise RuntimeError("cannot subscribe")

    async def build(bus: Bus, _: Settings, __: AsyncExitStack) -> Service:
        return Broken(bus, log)

    with pytest.raises(RuntimeError, match="cannot subscribe"):
        async with running(build, SETTINGS, connector(LocalBroker(), log)):
            pytest.fail("a service whose start failed must not run")
    assert log[-3:] == ["stopped taking work", "draining", "bus closed"]


async def test_a_failed_build_closes_the_bus() -> None:
    log: list[str] = []

    async def build(bus: Bus, _: Settings, __: AsyncExitStack) -> Service:
        raise OSError("model not found")

    with pytest.raises(OSError, match="model not found"):
        async with running(build, SETTINGS, connector(LocalBroker(), log)):
            pass
    assert log == ["bus closed"]
