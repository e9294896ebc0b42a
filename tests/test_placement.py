"""Prefix-aware placement: the node holding a prompt's prefix when it has room, else the least
loaded; dead or silent nodes never chosen."""

from __future__ import annotations

from shared.core.placement import PREFIX_SLACK, Placement

KEYS = [f"k{i}" for i in range(6)]


def two_nodes(a_load: int = 0, b_load: int = 0) -> Placement:
    placement = Placement(stale_after_s=3.0)
    placement.observe("a", running=a_load, waiting=0, now=0.0)
    placement.observe("b", running=b_load, waiting=0, now=0.0)
    return placement


def test_no_node_known_means_any() -> None:
    assert Placement(stale_after_s=3.0).choose(KEYS, now=0.0) is None


def test_the_least_loaded_node_takes_a_new_prompt() -> None:
    assert two_nodes(a_load=3, b_load=1).choose(KEYS, now=1.0) == "b"
    placement = two_nodes(a_load=2, b_load=0)
    placement.observe("a", running=0, waiting=1, now=0.5)  # waiting counts as load
    assert placement.choose(KEYS, now=1.0) == "b"


def test_requests_placed_between_telemetry_spread() -> None:
    """A request counts as load from the moment it is placed (before it is even dispatched),
    so a burst placed together is spread; the next telemetry says what really runs."""
    placement = two_nodes()
    chosen = [placement.choose([f"p{i}"], now=1.0) for i in range(4)]
    assert sorted(c or "" for c in chosen) == ["a", "a", "b", "b"]
    placement.observe("a", running=0, waiting=0, now=1.5)
    assert placement.nodes["a"].load == 0 and placement.nodes["b"].load == 2


def test_the_prefix_holder_takes_the_prompt_while_it_has_room() -> None:
    placement = two_nodes()
    placement.placed("a", KEYS[:4])
    placement.observe("a", running=PREFIX_SLACK, waiting=0, now=1.0)
    placement.observe("b", running=0, waiting=0, now=1.0)
    assert placement.choose(KEYS, now=1.5) == "a"  # its prefix is there, within the slack
    placement.observe("a", running=PREFIX_SLACK + 1, waiting=0, now=2.0)
    assert placement.choose(KEYS, now=2.5) == "b"  # too busy: the least loaded instead


def test_the_deepest_known_chunk_decides_and_newer_placements_win() -> None:
    placement = two_nodes()
    placement.placed("a", KEYS[:2])
    placement.placed("b", KEYS[:5])  # b now holds the longer prefix
    assert placement.prefix_holder(KEYS) == "b"
    assert placement.prefix_holder(["other", *KEYS]) is None  # chained: no shared first chunk


def test_a_silent_or_forgotten_node_is_not_chosen() -> None:
    placement = two_nodes(a_load=0, b_load=5)
    placement.placed("a", KEYS)
    assert placement.choose(KEYS, now=3.0) == "a"
    placement.observe("b", running=5, waiting=0, now=4.0)
    assert placement.choose(KEYS, now=4.0) == "b"  # a has not spoken for 4 s
    placement.observe("a", running=0, waiting=0, now=4.5)
    placement.forget("a")  # it did not answer
    assert placement.choose(KEYS, now=4.5) == "b"
    placement.forget("b")
    assert placement.choose(KEYS, now=4.5) is None


def test_nodes_whose_loader_is_alive_come_first() -> None:
    placement = two_nodes(a_load=0, b_load=4)
    placement.observe("a", running=0, waiting=0, now=2.0)
    placement.observe("b", running=4, waiting=0, now=2.0)
    placement.observe_loader("a", now=0.0)
    placement.observe_loader("b", now=2.0)
    assert placement.choose(KEYS, now=2.5) == "a"  # both loaders heard recently: least loaded
    assert placement.choose(KEYS, now=3.5) == "b"  # a's loader silent: b, busier but whole
    placement.observe("b", running=4, waiting=0, now=10.0)
    placement.observe("a", running=0, waiting=0, now=10.0)
    assert placement.choose(KEYS, now=10.0) == "a"  # no loader alive anywhere: compute decides


def test_remembered_keys_are_bounded_least_recently_placed_first() -> None:
    placement = Placement(stale_after_s=3.0, remembered_keys=4)
    placement.placed("a", ["x1", "x2", "x3"])
    placement.placed("b", ["y1", "y2", "y3"])
    assert list(placement.holder) == ["x3", "y1", "y2", "y3"]
    assert placement.prefix_holder(["x1", "x2", "x3"]) is None
