"""The model runner: chunked prefill, merged caches, suffix prefill and decoding.

Works with any transformers causal LM whose cache is a plain per-layer key/value cache
(DynamicCache made only of DynamicLayer). Sliding-window, hybrid and state-space models are
refused: a chunk loaded into them would not be exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer

from shared.core.errors import ConfigError, UnsupportedModelError
from shared.core.keys import KVLayout
from shared.core.request import Sampling
from shared.kv.batch import ATTENTION as STEP_ATTENTION
from shared.kv.batch import StepCache
from shared.kv.codec import dtype_name, torch_dtype
from shared.kv.slots import KVCache, SlotCache
from shared.kv.tokenizer import DEFAULT_MODEL, RANDOM_PREFIX, ByteTokenizer, uses_byte_tokenizer

DEFAULT_SEED = 1234
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (as vLLM's _SAMPLING_EPS)

# config keys that describe where or how a model was loaded, not what it computes
# (architectures is filled in by save_pretrained; the model class name stands for it)
_VOLATILE_CONFIG_KEYS = {"transformers_version", "torch_dtype", "dtype", "architectures"}


def default_model_config(**overrides: Any) -> LlamaConfig:
    """The embedded default: a small Llama (GQA, RoPE) over the byte-level vocabulary."""
    params: dict[str, Any] = {
        "vocab_size": ByteTokenizer.vocab_size,
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 500000.0,
        "initializer_range": 0.1,
        "bos_token_id": ByteTokenizer.BOS,
        "eos_token_id": ByteTokenizer.EOS,
        "tie_word_embeddings": False,
    }
    params.update(overrides)
    return LlamaConfig(**params)


# random-weight stand-ins for real shapes (benchmarks without downloads): "random:<name>"
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama3-8b": {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "initializer_range": 0.02,
    },
    "llama3-1b": {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
        "initializer_range": 0.02,
    },
}  # fmt: skip


def load_config(source: str, revision: str | None = None) -> Any:
    """A model's config without its weights: built-in ones, a local directory or a hub id."""
    if source == DEFAULT_MODEL:
        return default_model_config()
    if source.startswith(RANDOM_PREFIX):
        shape = source.removeprefix(RANDOM_PREFIX)
        if shape not in RANDOM_SHAPES:
            raise ConfigError(f"unknown random shape {shape!r}; use one of {sorted(RANDOM_SHAPES)}")
        return default_model_config(**RANDOM_SHAPES[shape])
    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model config from {source!r}: {exc}") from exc


def check_plain_kv(config: Any) -> None:
    """Raise UnsupportedModelError unless every layer keeps a plain, full-length KV cache."""
    try:
        layers = DynamicCache(config=config).layers
    except Exception as exc:  # a config the cache code cannot even read
        raise UnsupportedModelError(f"cannot build a KV cache for this model: {exc}") from exc
    kinds = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if kinds or not layers:
        raise UnsupportedModelError(
            f"model type {getattr(config, 'model_type', '?')!r} keeps a "
            f"{', '.join(kinds) or 'non-KV'} cache (sliding-window, hybrid or state-space); "
            "Cake serves only models whose every layer keeps full keys and values"
        )


def config_fingerprint(config: Any) -> str:
    """sha256 of the architecture config, leaving out load-time fields."""
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 over each parameter's name, shape, dtype and an evenly strided sample of values.

    Cheap for large models and deterministic across machines; any retrained or fine-tuned
    weights change the sampled values.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pick_token(
    logits: torch.Tensor,
    sampling: Sampling,
    gen: torch.Generator | None,
    prompt_ids: Sequence[int] | torch.Tensor = (),
    output_ids: Sequence[int] = (),
) -> int:
    """Greedy argmax, or temperature / top-p sampling with the given generator (a temperature
    below GREEDY_BELOW is greedy: dividing by it would overflow), after the request's logit
    bias and penalties (which need the prompt's and the output's ids so far)."""
    logits = penalised(logits, sampling, prompt_ids, output_ids)
    if sampling.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < sampling.top_p
        keep[0] = True  # the likeliest token always (a top_p below float32's range keeps none)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen).item())


def penalised(
    logits: torch.Tensor,
    sampling: Sampling,
    prompt_ids: Sequence[int] | torch.Tensor,
    output_ids: Sequence[int],
) -> torch.Tensor:
    """The logits with logit_bias added, then penalties applied as vLLM does: repetition over
    the tokens of prompt and output (a positive logit divided by it, a negative one
    multiplied), frequency and presence over the output (subtracted per occurrence, and once)."""
    if not sampling.penalises:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    if sampling.logit_bias:
        ids, bias = zip(*sampling.logit_bias, strict=True)
        logits.index_add_(0, torch.tensor(ids), torch.tensor(bias, dtype=logits.dtype))
    counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
    if sampling.repetition_penalty != 1.0:
        seen = counts > 0
        seen[torch.as_tensor(prompt_ids, dtype=torch.long)] = True
        scaled = torch.where(
            logits > 0, logits / sampling.repetition_penalty, logits * sampling.repetition_penalty
        )
        logits = torch.where(seen, scaled, logits)
    return logits - sampling.frequency_penalty * counts - sampling.presence_penalty * (counts > 0)


class ModelRunner:
    """One loaded causal LM and the cache operations Cake builds on."""

    def __init__(self, model: Any, name: str, weights_id: str | None = None) -> None:
        self.model = model.eval()
        self.model.set_attn_implementation(STEP_ATTENTION)  # stock SDPA outside batched steps
        self.config: Any = model.config
        self.name = name
        check_plain_kv(self.config)
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        text_cfg = self.config.get_text_config()
        heads = text_cfg.num_attention_heads
        head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
        self.layout = KVLayout(
            layers=text_cfg.num_hidden_layers,
            kv_heads=getattr(text_cfg, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            dtype=dtype_name(self.dtype),
        )
        self.max_context = int(getattr(text_cfg, "max_position_embeddings", 0) or 0) or None
        self.vocab_size = int(text_cfg.vocab_size)
        weights = weights_id or weights_fingerprint(model)
        identity = f"{type(model).__name__}:{config_fingerprint(self.config)}:{weights}"
        self.fingerprint = hashlib.sha256(identity.encode()).hexdigest()

    @classmethod
    def load(
        cls,
        source: str = DEFAULT_MODEL,
        dtype: str = "float32",
        device: str = "cpu",
        revision: str | None = None,
        seed: int = DEFAULT_SEED,
    ) -> ModelRunner:
        """The embedded default model, or a causal LM from a local directory or hub id."""
        torch_type = torch_dtype(dtype)
        config = load_config(source, revision)
        check_plain_kv(config)  # refuse before spending time on the weights
        if uses_byte_tokenizer(source):  # built from the config with a fixed seed
            with torch.random.fork_rng(devices=[]), torch.device(device):
                torch.manual_seed(seed)
                model = AutoModelForCausalLM.from_config(config, dtype=torch_type)
            return cls(model, name=source)
        pretrained: Any = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, dtype=torch_type
        )
        return cls(pretrained.to(device), name=source)

    # --- caches -----------------------------------------------------------------------------

    def measure_chunk_s(self, chunk_tokens: int, step_tokens: int) -> float:
        """Seconds per chunk of chunk_tokens in head steps of step_tokens: two steps, one at the
        start of a prompt and one after it (after an untimed warm-up step)."""
        ids = [i % self.vocab_size for i in range(1, 2 * step_tokens + 1)]
        self.extend(self.new_cache(capacity=step_tokens), ids[:step_tokens])  # warm-up
        cache = self.new_cache(capacity=2 * step_tokens)
        self.synchronize()
        started = time.perf_counter()
        self.extend(cache, ids[:step_tokens])
        self.extend(cache, ids[step_tokens:])
        self.synchronize()
        return (time.perf_counter() - started) * chunk_tokens / (2 * step_tokens)

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU), so a clock reads it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty cache: a slot of `capacity` tokens (written in place), or a growing
        DynamicCache when no capacity is given."""
        if capacity is None:
            return DynamicCache(config=self.config)
        return SlotCache(self.layout, capacity, self.dtype, self.device)

    def _ids(self, token_ids: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)

    def extend(self, cache: KVCache, token_ids: Sequence[int]) -> torch.Tensor:
        """Run token_ids after what cache holds, appending their KV; the last token's logits."""
        return self.step([(cache, token_ids)])[0]

    @torch.inference_mode()
    def step(self, pieces: Sequence[tuple[KVCache, Sequence[int]]]) -> torch.Tensor:
        """One forward pass over the pieces of several requests (each runs its token ids after
        what its own cache holds, and appends their KV there); the last logits of each piece,
        shape (pieces, vocab). A piece alone gives the same bits as a stock forward pass."""
        lengths = [len(ids) for _, ids in pieces]
        if not pieces or min(lengths) == 0:
            raise ValueError("a step needs at least one piece of at least one token")
        held = [self.cache_length(cache) for cache, _ in pieces]
        ids = self._ids([t for _, piece in pieces for t in piece])
        positions = torch.cat([torch.arange(h, h + n) for h, n in zip(held, lengths, strict=True)])
        last = torch.cumsum(torch.tensor(lengths), 0) - 1
        step = StepCache([cache for cache, _ in pieces], lengths)
        out = self.model(
            input_ids=ids, position_ids=positions[None].to(self.device), cache=step,
            use_cache=False, logits_to_keep=last.to(self.device), cake_step=step,
        )  # fmt: skip
        return out.logits[0]

    def sampler(self, sampling: Sampling) -> torch.Generator | None:
        """The random generator a request samples with (None when greedy)."""
        if sampling.temperature < GREEDY_BELOW:
            return None
        gen = torch.Generator(device="cpu")
        gen.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())
        return gen

    def prefill_chunks(
        self, cache: KVCache, token_ids: Sequence[int], chunk_tokens: int
    ) -> torch.Tensor | None:
        """extend() in pieces of chunk_tokens (chunked prefill); logits of the last token."""
        logits = None
        for start in range(0, len(token_ids), chunk_tokens):
            logits = self.extend(cache, token_ids[start : start + chunk_tokens])
        return logits

    def chunk_kv(self, cache: KVCache, start: int, end: int) -> torch.Tensor:
        """A copy of the cache's KV for tokens [start, end): (layers, 2, kv_heads, tokens, dim)."""
        layers: list[Any] = list(cache.layers)  # all DynamicLayer: checked at load
        parts = [
            torch.stack((layer.keys[0, :, start:end], layer.values[0, :, start:end]))
            for layer in layers
        ]
        return torch.stack(parts).contiguous()

    def append_kv(self, cache: KVCache, chunks: Sequence[torch.Tensor]) -> None:
        """Append loaded chunk KVs (in token order) to the cache: a slot takes each chunk in one
        copy (converting it); a DynamicCache, one concatenation per layer."""
        if isinstance(cache, SlotCache):
            for kv in chunks:
                cache.append(kv)
        elif chunks:
            kv = torch.cat([c.to(device=self.device, dtype=self.dtype) for c in chunks], dim=3)
            for i in range(self.layout.layers):
                cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)

    def cache_length(self, cache: KVCache) -> int:
        """Tokens held in the cache."""
        return int(cache.get_seq_length())

    # --- generation -------------------------------------------------------------------------

    def generate(
        self,
        cache: KVCache,
        logits: torch.Tensor,
        sampling: Sampling,
        stop_token_ids: frozenset[int] = frozenset(),
        prompt_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield up to max_tokens new ids from the prompt's last logits; stops after a stop id.
        (prompt_ids: the prompt, for a repetition penalty.)"""
        gen, output = self.sampler(sampling), list[int]()
        for n in range(sampling.max_tokens):
            token = pick_token(logits.cpu(), sampling, gen, prompt_ids, output)
            output.append(token)
            yield token
            if token in stop_token_ids or n + 1 == sampling.max_tokens:
                return
            logits = self.extend(cache, [token])


def default_kv_budget_bytes(device: torch.device | str, share: float = 0.4) -> int:
    """A KV memory budget when none is set: `share` of the accelerator's free memory (after
    the weights are loaded), or of the memory this process may still use: the host's available
    memory, or what its container's cgroup limit leaves, whichever is smaller."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * share)
    return int(min(host_available_bytes(), cgroup_available_bytes()) * share)


def host_available_bytes() -> int:
    """MemAvailable of the host."""
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cgroup_available_bytes(root: str = "/sys/fs/cgroup") -> float:
    """What the cgroup (v2, else v1) memory limit leaves; infinity when there is none."""
    for limit_file, usage_file in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(root, limit_file).read_text().strip()
            usage = int(Path(root, usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # v1 spells "no limit" as a huge number
            return max(0, int(limit) - usage)
    return float("inf")
