"""Merged-cache vs compute-only, for any model/dtype/device: max logit difference and tokens.

    python scripts/exactness_check.py --model random:llama3-1b --dtype bfloat16 --device cuda

Prints one JSON line per meeting point and exits 1 if greedy tokens differ beyond --tolerance
in the first-token logits (float32 on CPU is expected to be exact).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys

from shared.core.keys import KeySpace, PromptChunks
from shared.core.plan import Split
from shared.core.request import Sampling
from shared.kv.engine import fetch_chunk, merged_prefill, write_back
from shared.kv.model import ModelRunner
from shared.storage.memory import MemoryStore


async def check(args: argparse.Namespace) -> bool:
    runner = ModelRunner.load(args.model, args.dtype, args.device)
    rng = random.Random(0)
    ids = [rng.randrange(256) for _ in range(args.tokens)]
    prompt = PromptChunks.of(KeySpace(runner.fingerprint, runner.layout, args.chunk), ids)
    greedy = Sampling(max_tokens=args.new_tokens)
    cache = runner.new_cache()
    logits = runner.prefill_chunks(cache, ids, args.chunk)
    assert logits is not None
    want_logits = logits.float()
    store = MemoryStore()
    await write_back(runner, store, prompt, cache)
    want = list(runner.generate(cache, logits, greedy))
    hit = (len(ids) - 1) // args.chunk
    loaded = {j: await fetch_chunk(store, prompt, j) for j in range(hit)}
    ok = True
    for meet in sorted({0, hit // 4, hit // 2, 3 * hit // 4, hit}):
        merged, got_logits = merged_prefill(runner, prompt, Split(meet, hit), loaded)  # type: ignore[arg-type]
        diff = (got_logits.float() - want_logits).abs().max().item()
        got = list(runner.generate(merged, got_logits, greedy))
        same = got == want
        ok &= diff <= args.tolerance
        print(json.dumps({"meet": meet, "hit": hit, "max_logit_diff": diff, "tokens_equal": same}))
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="default")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=0.0)
    return 0 if asyncio.run(check(p.parse_args())) else 1


if __name__ == "__main__":
    sys.exit(main())
