"""End to end over HTTP with the official openai client: all four services, real NATS and S3."""

from __future__ import annotations

import asyncio
import random
import string
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest

from services.launcher.stack import SERVICES
from shared.core.request import Sampling
from shared.kv.tokenizer import ByteTokenizer
from tests.harness import Backend, default_runner, s3_backend


def text(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_letters + " ") for _ in range(n))


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path, s3_endpoint: str) -> AsyncIterator[Backend]:
    async with s3_backend(nats_url, tmp_path, s3_endpoint, SERVICES) as be:
        yield be


async def complete(
    client: openai.AsyncOpenAI,
    prompt: str | list[int],
    kv_mode: str = "cake",
    salt: str = "",
    extra_body: dict[str, Any] | None = None,
) -> tuple[str, dict[str, Any], int]:
    """Text, the cake object and cached_tokens of one greedy completion."""
    extra = {"kv_mode": kv_mode, **({"cache_salt": salt} if salt else {}), **(extra_body or {})}
    out = await client.completions.create(
        model="default", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
    )
    assert out.usage is not None and out.usage.prompt_tokens_details is not None
    assert out.model_extra is not None
    return (
        out.choices[0].text,
        out.model_extra["cake"],
        out.usage.prompt_tokens_details.cached_tokens or 0,
    )


async def test_modes_give_identical_text_and_prefixes_hit(stack: Backend) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    base = text(700, seed=1)
    partial = base[:450] + text(200, seed=2)
    longer = base + text(60, seed=3)
    ref = {
        p: (await complete(client, p, "compute", salt="ref"))[0] for p in (base, partial, longer)
    }
    no_hit_text, cake, cached = await complete(client, base)  # first sight: no hit
    assert cached == 0 and cake["chunks_loaded"] == 0 and no_hit_text == ref[base]
    for prompt, want_hit in ((base, 10), (partial, 7), (longer, 10)):
        got, cake, cached = await complete(client, prompt)
        assert got == ref[prompt]
        assert cake["hit_tokens"] == want_hit * 64
        assert cached == cake["chunks_loaded"] * 64  # what was loaded, not what was computed
        for mode in ("load", "compute"):
            assert (await complete(client, prompt, mode))[0] == ref[prompt], mode


async def test_a_prompt_of_token_ids_is_the_prompt_those_ids_encode(stack: Backend) -> None:
    """OpenAI's completions API (and vLLM) take a prompt as token ids too: the same answer, and
    its stored prefix is found either way."""
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    prompt = text(500, seed=6)
    ids = ByteTokenizer().encode(prompt)
    by_text, _, _ = await complete(client, prompt, "compute")
    by_ids, cake, cached = await complete(client, ids)
    assert by_ids == by_text
    assert cake["hit_tokens"] == 7 * 64 and cached == cake["chunks_loaded"] * 64
    assert (await complete(client, [ids]))[0] == by_text  # a list of one prompt


async def test_penalties_and_logit_bias_act_and_every_mode_agrees(stack: Backend) -> None:
    """Penalties see the prompt's and the output's tokens, wherever the prompt's KV came from:
    Cake and load-only answer what compute-only does, and the model run in this process."""
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    prompt = text(500, seed=7)
    penalties = {"repetition_penalty": 1.6, "frequency_penalty": 0.7, "presence_penalty": 0.4}
    plain, _, _ = await complete(client, prompt, "compute")  # stores the prefix
    ref, _, _ = await complete(client, prompt, "compute", salt="ref", extra_body=penalties)
    assert ref != plain
    runner, tokenizer = default_runner(), ByteTokenizer()
    ids = tokenizer.encode(prompt)
    cache = runner.new_cache()
    sampling = Sampling(max_tokens=12, **penalties)
    expected = runner.generate(cache, runner.extend(cache, ids), sampling, prompt_ids=ids)
    assert ref == tokenizer.decode(list(expected))
    for mode in ("cake", "load"):
        got, cake, _ = await complete(client, prompt, mode, extra_body=penalties)
        assert got == ref and cake["hit_tokens"] == 7 * 64, mode
    forced = tokenizer.encode("z")[-1]
    biased, _, _ = await complete(client, prompt, extra_body={"logit_bias": {str(forced): 100}})
    assert biased == "z" * 12


async def test_a_list_of_prompts_answers_each_as_if_sent_alone(stack: Backend) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    prompts: list[Any] = [text(300, seed=20), text(500, seed=21)]
    alone = [(await complete(client, p, "compute", salt="ref"))[0] for p in prompts]
    await complete(client, prompts[1], "compute")  # stores its prefix
    prompts.append(ByteTokenizer().encode(prompts[0]))  # the first again, as token ids
    out = await client.completions.create(
        model="default", prompt=prompts, max_tokens=12, temperature=0
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [*alone, alone[0]]
    assert out.model_extra is not None
    assert [c["hit_tokens"] for c in out.model_extra["cake"]] == [0, 7 * 64, 0]
    assert out.usage is not None and out.usage.prompt_tokens == 301 + 501 + 301


async def test_salts_isolate_and_streams_match(stack: Backend) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    prompt = text(400, seed=4)
    first, _, cached = await complete(client, prompt, salt="tenant-a")
    assert cached == 0
    assert (await complete(client, prompt, salt="tenant-b"))[2] == 0
    again, cake, cached = await complete(client, prompt, salt="tenant-a")
    assert cake["hit_tokens"] == 6 * 64 and cached == cake["chunks_loaded"] * 64
    assert again == first
    stream = await client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": prompt}], max_tokens=8,
        stream=True, extra_body={"cache_salt": "tenant-a"},
    )  # fmt: skip
    pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(pieces) >= 2


async def test_concurrent_requests_complete(stack: Backend) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused")
    prompts = [text(300 + 40 * i, seed=10 + i) for i in range(6)]
    refs = [(await complete(client, p, "compute", salt="ref"))[0] for p in prompts]
    await asyncio.gather(*(complete(client, p) for p in prompts))  # store them all
    results = await asyncio.gather(*(complete(client, p) for p in prompts for _ in range(2)))
    for i, (got, cake, cached) in enumerate(results):
        assert got == refs[i // 2]
        assert cake["hit_tokens"] > 0 and cake["chunks_total"] >= 5
        assert cached == cake["chunks_loaded"] * 64
