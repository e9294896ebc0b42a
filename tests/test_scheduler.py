"""The scheduler's policy: priority, first come first served, cut pieces, decode share, aging,
budget accounting and bounded waiting."""

from __future__ import annotations

import random

from shared.core.scheduler import Candidate, Phase, Piece, plan_step

D, P, H = Phase.DECODE, Phase.PREFILL, Phase.HEAD


def cand(rid: str, phase: Phase, tokens: int, arrival: float = 0.0, **kw: int) -> Candidate:
    return Candidate(rid, phase, tokens, arrival, **kw)


def granted(pieces: list[Piece]) -> dict[str, int]:
    return {p.request_id: p.tokens for p in pieces}


def test_a_prefill_that_does_not_fit_beside_a_decode_is_cut_not_skipped() -> None:
    # the case that starved prefills: [decode 1, prefill 512, head 256] with a 512 budget
    step = plan_step([cand("d", D, 1), cand("p", P, 512), cand("h", H, 256)], 512)
    assert granted(step) == {"d": 1, "p": 511}  # the head (lower priority) does not jump ahead


def test_cuts_are_whole_granules() -> None:
    step = plan_step([cand("d", D, 1), cand("p", P, 512, granule=128)], 512)
    assert granted(step) == {"d": 1, "p": 384}
    step = plan_step([cand("p", P, 300, granule=128), cand("h", H, 512, 1.0, granule=128)], 512)
    assert granted(step) == {"p": 300, "h": 128}  # the rest of the budget, in whole chunks


def test_priority_then_arrival_within_a_class() -> None:
    step = plan_step(
        [cand("h-old", H, 64, 0.0), cand("p-new", P, 64, 5.0), cand("p-old", P, 64, 1.0)], 128
    )
    assert [p.request_id for p in step] == ["p-old", "p-new"]


def test_decodes_keep_their_share_and_prefill_keeps_the_rest() -> None:
    decodes = [cand(f"d{i}", D, 1, float(i)) for i in range(600)]
    step = plan_step([*decodes, cand("p", P, 4096, 1000.0)], 512, decode_share=0.5)
    counts = granted(step)
    assert sum(1 for rid in counts if rid.startswith("d")) == 256
    assert counts["p"] == 256
    assert sum(counts.values()) == 512


def test_without_waiting_prompts_decodes_take_the_whole_budget() -> None:
    decodes = [cand(f"d{i}", D, 1, float(i)) for i in range(600)]
    assert len(plan_step(decodes, 512)) == 512


def test_decodes_left_out_go_first_next_time() -> None:
    decodes = [cand("late", D, 1, 9.0, waited=3), *[cand(f"d{i}", D, 1, i) for i in range(4)]]
    step = plan_step([*decodes, cand("p", P, 100)], 4, decode_share=0.5)
    assert [p.request_id for p in step if p.phase == D] == ["late", "d0"]


def test_an_aged_request_goes_before_newer_higher_priority_work() -> None:
    fresh = cand("p", P, 512, 2.0, granule=64)
    aged = cand("h", H, 256, 1.0, granule=64, waited=8)
    assert granted(plan_step([fresh, aged], 512, aging_steps=8)) == {"h": 64, "p": 448}
    young = cand("h", H, 256, 1.0, granule=64, waited=7)
    assert granted(plan_step([fresh, young], 512, aging_steps=8)) == {"p": 512}


def test_waiting_and_finished_requests_do_not_run() -> None:
    step = plan_step([cand("w", Phase.WAITING, 64), cand("f", Phase.FINISHED, 1)], 512)
    assert step == []


def test_a_granule_larger_than_the_budget_still_runs_when_alone() -> None:
    assert granted(plan_step([cand("p", P, 1024, granule=1024)], 512)) == {"p": 1024}
    # but not beside other work, which fits
    step = plan_step([cand("d", D, 1), cand("p", P, 1024, granule=1024)], 512)
    assert granted(step) == {"d": 1}


def test_a_head_is_not_starved_by_a_stream_of_prefills() -> None:
    waited, steps = 0, 0
    for step_no in range(100):  # a new 512-token prompt every step: prefill alone fills it
        prefills = [cand(f"p{step_no}", P, 512, float(step_no), granule=64)]
        head = cand("h", H, 256, -1.0, granule=64, waited=waited)
        step = granted(plan_step([*prefills, head], 512, aging_steps=8))
        waited = 0 if "h" in step else waited + 1
        steps = step_no
        if "h" in step:
            break
    assert steps == 8  # it ran as soon as it had waited aging_steps steps


def test_every_runnable_request_progresses_within_a_bounded_number_of_steps() -> None:
    rng = random.Random(7)
    budget, aging, chunk = 512, 8, 64
    work: dict[str, list[int | Phase]] = {}  # id -> [phase, tokens left, waited]
    arrivals: dict[str, float] = {}
    worst = 0
    for step_no in range(2000):
        if rng.random() < 0.15:  # a new request: a long prompt or a Cake head
            rid = f"r{step_no}"
            phase = rng.choice([P, H])
            work[rid] = [phase, rng.randrange(1, 40) * chunk, 0]
            arrivals[rid] = float(step_no)
        candidates = [
            cand(rid, w[0], 1 if w[0] == D else min(int(w[1]), 512), arrivals[rid],  # type: ignore[arg-type]
                 granule=1 if w[0] == D else chunk, waited=int(w[2]))
            for rid, w in work.items()
        ]  # fmt: skip
        pieces = plan_step(candidates, budget, aging_steps=aging)
        assert sum(p.tokens for p in pieces) <= budget
        ran = {p.request_id: p.tokens for p in pieces}
        for rid in list(work):
            phase, left, waited = work[rid]
            if rid not in ran:
                work[rid][2] = int(waited) + 1
                worst = max(worst, int(work[rid][2]))
                continue
            work[rid][2] = 0
            if phase == D:
                left = int(left) - 1
                if left <= 0:
                    del work[rid]
                continue
            left = int(left) - ran[rid]
            work[rid][1] = left
            if left <= 0:  # prompt done: decode 16 tokens
                work[rid] = [D, 16, 0]
    # about half the step's capacity on average, in bursts; nothing waits long
    assert worst <= 3 * aging, worst


def test_a_budget_of_one_chunk_alternates_instead_of_starving_either_side() -> None:
    decodes = [cand(f"d{i}", D, 1, float(i)) for i in range(3)]
    prefill = cand("p", P, 512, 9.0, granule=256)
    assert granted(plan_step([*decodes, prefill], 256)) == {"p": 256}  # room for its chunk
    aged = [cand(f"d{i}", D, 1, float(i), waited=8) for i in range(3)]
    assert "p" not in granted(plan_step([*aged, prefill], 256))  # then the decodes' turn
    assert len(plan_step([*aged, prefill], 256)) == 3


def test_finish_first_cuts_a_long_prefill_to_the_suffix_that_ends_a_prompt() -> None:
    """A 128-token suffix ends its prompt: the 1,536-token prefill beside it (first come) runs
    128 tokens this step, so the suffix's first token does not wait for it; the head that came
    after the suffix's request waits."""
    cands = [
        cand("long", P, 1536, 0.0, granule=128),
        cand("suffix", P, 128, 1.0, granule=128, ends_loaded_prompt=True),
        cand("head", H, 512, 2.0, granule=128),
        cand("d", D, 1),
    ]
    assert granted(plan_step(cands, 2176)) == {"d": 1, "long": 1536, "suffix": 128, "head": 384}
    first = granted(plan_step(cands, 2176, finish_first=True))
    assert first == {"d": 1, "long": 128, "suffix": 128}


def test_finish_first_runs_a_head_racing_its_loads_ahead_of_a_later_prompt() -> None:
    """The disturbed replay's loss: a 2,048-token prompt that came after a Cake request took the
    step ahead of its 512-token head (prefill before heads), and the head's next step took
    1.37 s instead of 0.27 s. With finish_first the head goes first by arrival, and the later
    prompt waits (beside it, it stretched the head's step by its own length: the fluctuating
    benchmark's disturbed requests, Cake's 1,280-token head step took 0.85 s beside 896 tokens
    of a later prompt, against 0.46 s alone); a granule once it waited the aging steps."""
    cands = [
        cand("head", H, 512, 0.0, granule=128, races_loads=True),
        cand("late", P, 2048, 1.0, granule=128),
        cand("d", D, 1),
    ]
    assert granted(plan_step(cands, 2176)) == {"d": 1, "late": 2048}  # the head waits a step
    assert granted(plan_step(cands, 2176, finish_first=True)) == {"d": 1, "head": 512}
    aged = [cands[0], cand("late", P, 2048, 1.0, granule=128, waited=8), cands[2]]
    assert granted(plan_step(aged, 2176, finish_first=True)) == {"d": 1, "head": 512, "late": 128}
    quiet = [cand("head", H, 512, 0.0, granule=128), *cands[1:]]  # computes it all: no race
    assert granted(plan_step(quiet, 2176, finish_first=True)) == {"d": 1, "late": 2048}


def test_a_racing_head_cuts_only_what_came_after_it() -> None:
    """A one-chunk probe does not cut an older prompt, another racing head or a prompt's last
    piece after its loads; a prompt that came after it waits."""
    cands = [
        cand("old", P, 1536, 0.0, granule=128),
        cand("probe", H, 128, 1.0, granule=128, races_loads=True),
        cand("other", H, 512, 2.0, granule=128, races_loads=True),
        cand("new", P, 1024, 3.0, granule=128),
    ]
    step = granted(plan_step(cands, 4096, finish_first=True))
    assert step == {"old": 1536, "probe": 128, "other": 512}
    ending = [*cands[:2], cand("suffix", P, 256, 2.0, granule=128, ends_loaded_prompt=True)]
    step = granted(plan_step(ending, 4096, finish_first=True))
    assert step == {"old": 256, "probe": 128, "suffix": 256}  # the suffix's cut, not the probe's


def test_finish_first_cuts_nothing_without_a_whole_last_piece() -> None:
    cands = [cand("a", P, 1024, 0.0, granule=128), cand("b", P, 256, 1.0, granule=128)]
    assert granted(plan_step(cands, 1152, finish_first=True)) == {"a": 1024, "b": 128}
    ending = [cands[0], cand("b", P, 256, 1.0, granule=128, ends_loaded_prompt=True)]
    assert granted(plan_step(ending, 1152, finish_first=True)) == {"a": 1024, "b": 128}  # b cut
    assert granted(plan_step(ending, 1280, finish_first=True)) == {"a": 256, "b": 256}


def test_a_prompt_cap_bounds_prompt_pieces_and_leaves_decodes_alone() -> None:
    cands = [cand(f"d{i}", D, 1) for i in range(300)] + [cand("p", P, 1024, granule=128)]
    step = granted(plan_step(cands, 2048, prompt_cap=128))
    assert step["p"] == 128 and sum(1 for r in step if r.startswith("d")) == 300


def test_finish_first_lets_the_smallest_ending_piece_set_the_cut() -> None:
    cands = [
        cand("a", P, 640, 0.0, granule=128, ends_loaded_prompt=True),
        cand("b", P, 200, 1.0, granule=128, ends_loaded_prompt=True),
    ]
    assert granted(plan_step(cands, 1024, finish_first=True)) == {"a": 128, "b": 200}
