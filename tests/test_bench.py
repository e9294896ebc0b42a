"""`cake bench`: the report's arithmetic on fixed numbers, and one small real run end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench.profile import Profile
from bench.report import summarize, table, write_report
from bench.scratch import scratch
from bench.sweep import cell_reps
from shared.runtime.config import SHM_ROOM_BYTES, staging_base


def row(
    context: int, ratio: float, compute: float, load: float, cake: float, oracle: float
) -> dict:
    ttft = {"compute": compute, "load": load, "cake": cake, "oracle": oracle}
    return {"context": context, "io_ratio": ratio, "bandwidth_MBps": 10.0 * ratio,
            "ttft_s": ttft, "meet_chunk": 2, "oracle_meet_chunk": 2, "chunks": 7}  # fmt: skip


ROWS = [
    row(2048, 0.5, 1.0, 2.0, 0.8, 0.7),
    row(2048, 1.0, 1.0, 1.0, 0.5, 0.5),
    row(2048, 2.0, 1.0, 0.5, 0.55, 0.44),
    {**row(4096, 1.0, 2.0, 2.2, 1.25, 1.0), "best_split_s": 1.1, "best_split_meet_chunk": 3},
]


def test_summary_ratios() -> None:
    s = summarize(ROWS, pipeline_ratio=1.02)
    assert s["cake_over_oracle_max"] == pytest.approx(1.25)  # 0.55 / 0.44
    assert s["cake_vs_best_baseline_min"] == pytest.approx(0.5 / 0.55)
    assert s["cake_vs_best_baseline_at_balance"] == pytest.approx(1.6)  # min(2.0, 1.6)
    assert s["pipeline_overhead"] == 1.02
    assert s["cake_over_best_split_at_balance"] == pytest.approx(1.25 / 1.1)
    assert summarize(ROWS[:3], 1.0)["cake_over_best_split_at_balance"] is None


def test_table_and_files(tmp_path: Path) -> None:
    text = table(ROWS)
    assert text.splitlines()[0].split()[:4] == ["context", "io", "MB/s", "compute"]
    assert "2.00" in text.splitlines()[3]  # best/cake of the balanced 2048 row
    assert text.splitlines()[5].endswith("1.100 at   3") and text.splitlines()[3].endswith(" -")
    events = [{"t": 0.1, "kind": "computed", "upto": 2}, {"t": 0.05, "kind": "loaded", "index": 6},
              {"t": 0.2, "kind": "first_token", "meet": 2}]  # fmt: skip
    results = {"rows": ROWS, "pipeline": {"ratio": 1.0}, "timeline": events}
    summary = write_report(results, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"] == summary
    for name in ("ttft.png", "timeline.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cells_on_fast_links_take_more_samples_of_cake_and_load_only() -> None:
    assert cell_reps(1, compute_s=1.3, io_ratio=1.0) == 1  # balance: as asked
    assert cell_reps(1, compute_s=1.3, io_ratio=4.0) == 3  # 0.33 s a load-only request
    assert cell_reps(1, compute_s=2.7, io_ratio=16.0) == 5  # 0.17 s: capped
    assert cell_reps(3, compute_s=2.7, io_ratio=0.25) == 3  # never fewer than asked


def test_oracle_profile_model() -> None:
    p = Profile(head_s=[0.0, 1.0, 2.0, 3.0, 4.0], read_s=[0.01] * 4, chunk_bytes=[10**6] * 4,
                finish_s=0.5)  # fmt: skip
    assert p.compute_s == [1.0] * 4
    assert p.load_s(1.0, 4) == [1.0] * 4  # 1 MB at 1 MB/s
    assert p.oracle(1.0, 4, fixed_s=0.1) == (2, pytest.approx(2.6))  # half each, + finish + fixed
    assert p.load_latency(5.0, 1.0, 0.1) == pytest.approx(0.4)  # 5.0 - 4 - 0.5 - 0.1


def test_a_small_benchmark_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "services.launcher.cli", "bench", "--quick", "--contexts", "512",
         "--io-ratios", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    (cell,) = results["rows"]
    calibration = results["calibration"][0]
    assert cell["chunks"] == 3 and 0 <= cell["meet_chunk"] <= 3
    compute_s = min(min(t["median"] for t in c["compute_ttft_s"].values())
                    for c in results["calibration"])  # fmt: skip
    assert cell["reps"] == cell_reps(1, compute_s, 1.0)  # compute_s: the calibration's best
    assert cell["bandwidth_MBps"] == pytest.approx(calibration["kv_rate_MBps"], rel=0.01)
    assert all(v > 0 for v in cell["ttft_s"].values())
    assert set(results["summary"]) == {
        "cake_over_oracle_max", "cake_over_best_split_at_balance", "cake_vs_best_baseline_min",
        "cake_vs_best_baseline_at_balance", "pipeline_overhead",
    }  # fmt: skip
    assert 0 <= cell["best_split_meet_chunk"] <= 3  # the balanced cell's measured best split
    assert set(cell["best_split_tried_s"]) == {"0", "1", "2", "3"}
    assert cell["best_split_s"] == pytest.approx(min(cell["best_split_tried_s"].values()), abs=1e-4)
    assert "cake_vs_best_baseline_at_balance" in run.stdout and "context" in run.stdout
    assert (out / "ttft.png").exists() and (out / "timeline.png").exists()


async def test_the_ceiling_reads_a_large_s3_object_whole_and_in_ranged_parts(
    s3_endpoint: str,
) -> None:
    from bench.ceiling import S3_BUCKET, large_object_rates
    from shared.storage import S3Store

    async with S3Store(S3_BUCKET, endpoint_url=s3_endpoint) as store:
        await store.ensure_bucket()
    rates = await large_object_rates(s3_endpoint, reps=1)
    assert set(rates) == {"one_get", "ranged"}
    assert all(rate > 0 for rate in rates.values())


async def test_the_measured_best_split_runs_each_meeting_point_and_follows_the_link() -> None:
    """bench.profile.best_split times real splits (head computed while the tail loads): on a
    link far slower than compute the best is computing everything; on an unthrottled one in
    memory, some loading pays."""
    from bench.profile import best_split
    from shared.core.keys import KeySpace, PromptChunks
    from shared.kv.engine import write_back
    from shared.storage import MemoryStore, ThrottledStore
    from tests.harness import default_runner

    runner = default_runner()
    prompt = PromptChunks.of(
        KeySpace(runner.fingerprint, runner.layout, 64), [i % 250 for i in range(449)]
    )
    store = MemoryStore()
    cache = runner.new_cache()
    runner.extend(cache, list(prompt.token_ids))
    assert await write_back(runner, store, prompt, cache) == 7
    drops: list[int] = []
    async with ThrottledStore(store, bandwidth_MBps=8) as slow:
        meet, seconds, tried = await best_split(
            runner, slow, prompt, 7, [0, 3, 7], 4, before_each=lambda: drops.append(1)
        )
    assert sorted(tried) == [0, 3, 7] and len(drops) == 3
    assert meet == 7 and seconds == tried[7] < tried[3] < tried[0]
    meet, _, tried = await best_split(runner, store, prompt, 7, [0, 7], 4, lambda: None)
    assert meet == 0 and tried[0] < tried[7]


def test_a_benchmark_stages_where_a_default_deployment_does_and_leaves_nothing() -> None:
    """The scratch directory is on disk; its `staging` is a fresh directory under the default
    staging area's base (shared memory here); both go when the run ends."""
    with scratch("cake-test-") as workdir:
        staging, in_process = ((workdir / n).resolve() for n in ("staging", "staging-in-process"))
        assert staging.parent == in_process.parent
        assert staging.parent.parent == staging_base().resolve()
        (workdir / "staging" / "chunk.kv").write_bytes(b"kv")
        assert (staging / "chunk.kv").read_bytes() == b"kv"
    assert not workdir.exists() and not staging.parent.exists()


def test_a_small_shared_memory_is_not_the_default_staging_area(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Docker gives a container 64 MiB of /dev/shm: staging there would fail every load, so
    the default goes to the temporary directory unless shared memory holds 1 GiB."""
    total = {"bytes": 64 << 20}
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(total=total["bytes"]))
    assert staging_base(tmp_path) == Path(tempfile.gettempdir())
    total["bytes"] = SHM_ROOM_BYTES
    assert staging_base(tmp_path) == tmp_path


def test_a_ceiling_line_says_how_far_load_only_is_from_the_storage_s_pace() -> None:
    """134 MB at 1,340 MB/s raw (0.1 s) + a 0.2 s suffix is 0.3 s ideal: a 0.39 s load-only TTFT
    is 1.3x of it; the loader delivered 134 MB in 0.19 s. Without a cold rate (S3), no cold
    ratio."""
    from bench.ceiling import store_result

    t = {"load_ttft_s": 0.39, "suffix_ttft_s": 0.2, "suffix_alone_ttft_s": 0.05}
    line = store_result(134_000_000, 32, 1340.0, 670.0, t)
    assert line["load_ttft_over_ideal_warm"] == 1.3
    assert line["load_ttft_over_ideal_cold"] == round(0.39 / 0.4, 3)
    assert line["delivered_MBps"] == round(134 / 0.19, 1)
    assert line["ratio"] == round(134 / 0.19 / 1340, 3)
    assert store_result(134_000_000, 32, 1340.0, None, t)["load_ttft_over_ideal_cold"] is None
