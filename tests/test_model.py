"""Model runner: loading, refusal of non-plain caches, fingerprints and sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, MambaConfig, MistralConfig

from shared.core.errors import ConfigError, UnsupportedModelError
from shared.core.request import Sampling
from shared.kv.model import (
    ModelRunner,
    cgroup_available_bytes,
    check_plain_kv,
    default_kv_budget_bytes,
    host_available_bytes,
    pick_token,
)
from shared.kv.tokenizer import ByteTokenizer, HFTokenizer, plain_chat_prompt
from tests.models import _COMMON, tiny_runner


def test_default_model_needs_no_download_and_is_deterministic() -> None:
    a = ModelRunner.load()
    b = ModelRunner.load()
    assert a.fingerprint == b.fingerprint
    assert a.layout.layers == 8 and a.layout.kv_heads == 4 and a.layout.head_dim == 64
    assert a.max_context == 32768
    ids = ByteTokenizer().encode("hello")
    la, lb = a.extend(a.new_cache(), ids), b.extend(b.new_cache(), ids)
    assert torch.equal(la, lb)


def test_default_model_in_bfloat16() -> None:
    r = ModelRunner.load(dtype="bfloat16")
    assert r.layout.dtype == "bfloat16" and r.dtype == torch.bfloat16
    assert r.fingerprint != ModelRunner.load().fingerprint


def test_fingerprint_changes_with_weights_and_architecture() -> None:
    a, b = tiny_runner("llama", seed=0), tiny_runner("llama", seed=1)
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == tiny_runner("llama", seed=0).fingerprint
    assert a.fingerprint != tiny_runner("qwen2", seed=0).fingerprint


@pytest.mark.parametrize(
    "config",
    [
        MistralConfig(**_COMMON, sliding_window=64),
        Gemma2Config(**_COMMON, head_dim=16),
        MambaConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2),
    ],
    ids=["mistral-sliding-window", "gemma2-hybrid", "mamba-state-space"],
)
def test_non_plain_caches_are_refused(config: object) -> None:
    with pytest.raises(UnsupportedModelError, match="Cake serves only"):
        check_plain_kv(config)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError):
        ModelRunner(model, name="refused")


def test_mistral_without_sliding_window_is_served() -> None:
    model = AutoModelForCausalLM.from_config(MistralConfig(**_COMMON, sliding_window=None))
    assert ModelRunner(model, name="mistral").layout.layers == 2


def test_local_directory_round_trip(tmp_path: pytest.TempPathFactory) -> None:
    runner = tiny_runner("qwen2")
    runner.model.save_pretrained(tmp_path)
    loaded = ModelRunner.load(str(tmp_path))
    assert loaded.fingerprint == runner.fingerprint
    with pytest.raises(ConfigError, match="cannot load model config"):
        ModelRunner.load(str(tmp_path / "missing"))


def test_sampling_is_reproducible_with_a_seed_and_stops() -> None:
    r = tiny_runner("llama")
    ids = list(range(30))

    def run(params: Sampling, stop_token_ids: frozenset[int] = frozenset()) -> list[int]:
        cache = r.new_cache()
        return list(r.generate(cache, r.extend(cache, ids), params, stop_token_ids))

    sampled = Sampling(max_tokens=20, temperature=1.0, top_p=0.9, seed=5)
    assert run(sampled) == run(sampled)
    assert run(sampled) != run(Sampling(max_tokens=20, temperature=1.0, seed=6))
    greedy = run(Sampling(max_tokens=20))
    assert len(greedy) == 20
    stop = greedy[3]
    first = greedy.index(stop)
    assert run(Sampling(max_tokens=20), frozenset({stop})) == greedy[: first + 1]


def test_top_p_keeps_only_the_nucleus() -> None:
    from shared.kv.model import pick_token

    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    gen = torch.Generator().manual_seed(0)
    params = Sampling(temperature=1.0, top_p=0.5)
    assert {pick_token(logits, params, gen) for _ in range(50)} == {0}
    params = Sampling(temperature=1.0, top_p=0.85)
    assert {pick_token(logits, params, gen) for _ in range(200)} == {0, 1}
    for tiny in (1e-300, 5e-324):  # below float32's range: still the likeliest token
        assert pick_token(logits, Sampling(temperature=2.0, top_p=tiny), gen) == 0


def test_logit_bias_and_penalties_change_logits_as_vllm_does() -> None:
    from shared.kv.model import penalised

    logits = torch.tensor([2.0, 1.0, -1.0, 0.5])
    plain = Sampling()
    assert penalised(logits, plain, [0, 1], [1]) is logits  # nothing asked: untouched
    biased = penalised(logits, Sampling(logit_bias=((3, 100.0), (0, -5.0))), [], [])
    assert biased.tolist() == [-3.0, 1.0, -1.0, 100.5]
    assert pick_token(logits, Sampling(logit_bias=((3, 100.0),)), None) == 3
    # repetition over prompt and output: positive logits divided, negative ones multiplied
    repeated = penalised(logits, Sampling(repetition_penalty=4.0), [0], [2])
    assert repeated.tolist() == [0.5, 1.0, -4.0, 0.5]
    assert pick_token(logits, Sampling(repetition_penalty=4.0), None, [0], [2]) == 1
    # frequency per occurrence in the output, presence once; the prompt does not count
    counted = penalised(
        logits, Sampling(frequency_penalty=0.5, presence_penalty=0.25), [3, 3], [1, 1, 0]
    )
    assert counted.tolist() == [2.0 - 0.75, 1.0 - 1.25, -1.0, 0.5]


def test_the_strongest_penalties_allowed_still_sample_finite_probabilities() -> None:
    """The fuzzer sent repetition_penalty 5e-324: positive logits divided by it are inf, and
    softmax gives NaN. The smallest allowed (0.01) with the smallest temperature that samples
    stays finite."""
    gen = torch.Generator().manual_seed(0)
    strongest = Sampling(temperature=1e-5, repetition_penalty=0.01, frequency_penalty=2.0,
                         presence_penalty=2.0, logit_bias=((1, 100.0),))  # fmt: skip
    # token 1: 1 + 100 of bias, over 0.01: 10,100, less 2 * 2 + 2; token 0: 80 / 0.01 = 8,000
    assert pick_token(torch.tensor([80.0, 1.0, -3.0]), strongest, gen, [0, 1], [1, 1]) == 1


def test_sampling_ranges_are_checked_in_one_place() -> None:
    assert (
        Sampling(presence_penalty=2, frequency_penalty=-2, logit_bias=((5, -100),)).problem(
            vocab_size=6
        )
        is None
    )
    bad = {
        "presence_penalty": Sampling(presence_penalty=2.5),
        "frequency_penalty": Sampling(frequency_penalty=-3),
        "repetition_penalty": Sampling(repetition_penalty=5e-324),  # found by the fuzzer: NaN
        "temperature": Sampling(temperature=3),
        "top_p": Sampling(top_p=0),
    }
    for name, sampling in bad.items():
        assert sampling.problem() is not None and sampling.problem()[0] == name  # type: ignore[index]
    too_big = Sampling(logit_bias=((1, 101.0),)).problem()
    assert too_big == (
        "logit_bias",
        "logit_bias values must be between -100 and 100, got 101.0 for token 1",
    )
    outside = Sampling(logit_bias=((6, 1.0),)).problem(vocab_size=6)
    assert outside is not None and "below the vocabulary size 6, got 6" in outside[1]


def test_byte_tokenizer_round_trip_and_chat() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert ids[0] == ByteTokenizer.BOS and tok.decode(ids) == "héllo ✓"
    chat = tok.encode_chat([{"role": "user", "content": "hi"}])
    assert tok.decode(chat) == plain_chat_prompt([{"role": "user", "content": "hi"}])
    assert tok.decode(chat).endswith("<|assistant|>\n")


def test_hf_tokenizer_adapter_uses_the_plain_layout_without_template() -> None:
    class Inner:
        eos_token_id = 2
        chat_template = None

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [1, *map(ord, text)] if add_special_tokens else list(map(ord, text))

        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            return "".join(chr(i) for i in ids if i > 2)

    tok = HFTokenizer(Inner())
    msgs = [{"role": "user", "content": "x"}]
    assert tok.decode(tok.encode_chat(msgs)) == plain_chat_prompt(msgs)


def test_random_shapes_are_real_model_configs_without_download() -> None:
    from shared.kv.model import load_config

    cfg = load_config("random:llama3-8b")
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.hidden_size) == (32, 8, 4096)
    check_plain_kv(cfg)
    with pytest.raises(ConfigError, match="unknown random shape"):
        load_config("random:gpt-17")
    with pytest.raises(ConfigError, match="unknown random shape"):
        ModelRunner.load("random:gpt-17")


def test_a_vanishing_temperature_is_greedy_not_nan() -> None:
    logits = torch.tensor([0.1, 2.0, -1.0, 1.9])
    for temperature in (1e-300, 1e-6):
        assert pick_token(logits, Sampling(temperature=temperature), None) == 1


def test_the_default_kv_budget_respects_a_container_limit(tmp_path: Path) -> None:
    (tmp_path / "memory.max").write_text("1000000000\n")
    (tmp_path / "memory.current").write_text("400000000\n")
    assert cgroup_available_bytes(str(tmp_path)) == 600_000_000
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_available_bytes(str(tmp_path)) == float("inf")
    assert 0 < default_kv_budget_bytes("cpu") <= host_available_bytes()
