"""The step budget: cut when decode steps run over the target ITL, grown back while under; a
prompt token's cost in a step, to size a step to the time left."""

from __future__ import annotations

import pytest

from shared.core.step_budget import StepBudget, TokenPace


def test_slow_decode_steps_cut_the_budget_in_whole_chunks_down_to_one() -> None:
    budget = StepBudget(target_s=0.1, granule=128, most=2048)
    assert budget.for_step(decoding=True) == 2048
    budget.observe(0.5, decoded=True)
    assert budget.tokens == 1408  # 2048 x 0.7, down to whole chunks
    for _ in range(20):
        budget.observe(0.5, decoded=True)
    assert budget.tokens == 128  # never below one chunk: prompts still progress
    assert budget.for_step(decoding=False) == 2048  # nobody decodes: the full budget


def test_fast_decode_steps_grow_it_back_a_chunk_at_a_time_up_to_the_most() -> None:
    budget = StepBudget(target_s=0.1, granule=128, most=512, tokens=128)
    budget.observe(0.05, decoded=True)
    assert budget.tokens == 256
    for _ in range(5):
        budget.observe(0.05, decoded=True)
    assert budget.tokens == 512
    budget.observe(5.0, decoded=False)  # a prefill-only step says nothing of ITL
    assert budget.tokens == 512


@pytest.mark.parametrize("kw", [{"target_s": 0}, {"granule": 0}, {"granule": 1024}])
def test_bad_settings(kw: dict[str, float]) -> None:
    args = {"target_s": 0.1, "granule": 128, "most": 512, **kw}
    with pytest.raises(ValueError):
        StepBudget(**args)  # type: ignore[arg-type]


def test_token_pace_sizes_a_step_to_the_seconds_left_in_whole_granules() -> None:
    pace = TokenPace()
    assert pace.tokens_within(1.0, 128) is None  # nothing measured yet
    pace.observe(0.128, 128)  # 1 ms a token
    assert pace.tokens_within(0.5, 128) == 384  # 500 tokens' time: three whole chunks
    assert pace.tokens_within(0.0, 128) == 128  # one chunk at least: the step still runs
    pace.observe(0.1, 0)  # a decode-only step says nothing of prompt tokens
    assert pace.seconds == pytest.approx(0.001)
    pace.observe(1.536, 512)  # 3 ms a token further into a prompt: the average moves halfway
    assert pace.seconds == pytest.approx(0.002)
    assert pace.tokens_within(0.6, 128) == 256  # 300 tokens' time


def test_token_pace_keeps_a_one_chunk_steps_whole_cost() -> None:
    """A step of one chunk costs its overhead too: about twice a chunk's share of a large step
    on the benchmark machine. Only steps of exactly a chunk count."""
    pace = TokenPace()
    pace.observe(0.512, 512, chunk=128)  # 0.128 s a chunk's share
    assert pace.chunk_step_s is None
    pace.observe(0.256, 128, chunk=128)
    assert pace.chunk_step_s == pytest.approx(0.256)
    pace.observe(0.128, 128, chunk=128)
    assert pace.chunk_step_s == pytest.approx(0.192)  # halfway
    pace.observe(0.1, 128)  # no chunk given (the start-up measurement's share): not a step
    assert pace.chunk_step_s == pytest.approx(0.192)
