"""Validation of OpenAI-style completion and chat requests (pure: no I/O).

Every rejection is a RequestError whose message says what to fix and which field (`param`)
is wrong; the gateway turns it into OpenAI's error body.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from shared.core.errors import BadRequestError, ErrorCode, http_status
from shared.core.keys import TENANT_SALT_PREFIX
from shared.core.request import KvMode, Sampling
from shared.kv.tokenizer import Message as ChatMessage
from shared.kv.tokenizer import Tokenizer

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 4
MAX_SALT_CHARS = 256
MAX_PROMPTS = 64  # prompts one completions request may list (each is its own choice)
SEED_RANGE = (-(2**63), 2**63 - 1)


class Endpoint(Enum):
    """Which OpenAI endpoint a request came to."""

    COMPLETIONS = "completions"
    CHAT = "chat"


class RequestError(BadRequestError):
    """A request Cake cannot serve: error code (and so HTTP status), the offending field and a
    message."""

    def __init__(
        self, message: str, param: str | None = None, code: ErrorCode = ErrorCode.BAD_REQUEST
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        self.status = http_status(code)


@dataclass(frozen=True)
class Limits:
    """What the served model allows."""

    model_name: str
    max_tokens_limit: int
    max_context: int | None = None


@dataclass(frozen=True)
class TokenIds:
    """A completion prompt given as token ids (as vLLM and OpenAI's completions API take it)."""

    ids: tuple[int, ...]


Prompt = str | TokenIds | tuple[ChatMessage, ...]  # completions: text or ids; chat: messages


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request: one or more prompts (completions take a list; chat has one), each
    answered as its own choice."""

    endpoint: Endpoint
    prompts: tuple[Prompt, ...]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    cache_salt: str = ""
    kv_mode: KvMode = KvMode.CAKE

    @property
    def prompt(self) -> Prompt:
        """The first (usually the only) prompt."""
        return self.prompts[0]


def decode_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in a request body."""
    try:
        body = json.loads(raw)
        bad = _invalid_unicode(body, "")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:
        raise RequestError("the request body is nested too deeply; send a flat object") from None
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, not {_kind(body)}")
    if bad is not None:
        raise RequestError(
            f"{bad or 'the body'} holds invalid Unicode (a lone surrogate such as \\ud800); "
            "send valid UTF-8 text",
            bad or None,
        )
    return body


def _invalid_unicode(value: Any, where: str) -> str | None:
    """Where a string that UTF-8 cannot encode (a lone surrogate) is in value, if anywhere."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    if isinstance(value, dict):
        inside = [(f"{where}.{key}".lstrip("."), key, item) for key, item in value.items()]
    elif isinstance(value, list):
        inside = [(f"{where}[{i}]", "", item) for i, item in enumerate(value)]
    else:
        return None
    for path, key, item in inside:
        found = _invalid_unicode(key, path) or _invalid_unicode(item, path)
        if found is not None:
            return found
    return None


def parse_request(body: Mapping[str, Any], endpoint: Endpoint, limits: Limits) -> ParsedRequest:
    """The validated request, or RequestError naming the first problem.

    Omitted or null fields take Sampling's defaults (16 tokens, or the limit when lower;
    greedy: temperature 0);
    fields Cake does not know are ignored, features it cannot honour (n, logprobs...) refused.
    """
    _check_model(body, limits.model_name)
    _check_unsupported(body)
    prompts: tuple[Prompt, ...]
    if endpoint is Endpoint.COMPLETIONS:
        prompts, max_tokens_field = _prompts(body), "max_tokens"
    else:
        prompts = (_messages(body),)
        legacy = body.get("max_tokens") is not None or body.get("max_completion_tokens") is None
        max_tokens_field = "max_tokens" if legacy else "max_completion_tokens"
    return ParsedRequest(
        endpoint=endpoint,
        prompts=prompts,
        sampling=_sampling(body, max_tokens_field, limits.max_tokens_limit),
        stop=_stop(body),
        stream=_optional(body, "stream", bool, False),
        cache_salt=_salt(body),
        kv_mode=_kv_mode(body),
    )


def tokenize(parsed: ParsedRequest, tokenizer: Tokenizer, limits: Limits) -> list[list[int]]:
    """Each prompt's token ids; RequestError when one of them and max_tokens overflow the
    context, or when logit_bias names a token outside the vocabulary."""
    _check_sampling(parsed.sampling, tokenizer.vocab_size)
    several = len(parsed.prompts) > 1
    return [
        _prompt_ids(prompt, f"prompt {i}: " if several else "", tokenizer, limits, parsed.sampling)
        for i, prompt in enumerate(parsed.prompts)
    ]


def _prompt_ids(
    prompt: Prompt, which: str, tokenizer: Tokenizer, limits: Limits, sampling: Sampling
) -> list[int]:
    if isinstance(prompt, str):
        ids, param = tokenizer.encode(prompt), "prompt"
    elif isinstance(prompt, TokenIds):
        ids, param = list(prompt.ids), "prompt"
        if max(ids) >= tokenizer.vocab_size:
            raise RequestError(
                f"{which}prompt token ids must be below the vocabulary size "
                f"{tokenizer.vocab_size}, got {max(ids)}",
                "prompt",
            )
    else:
        ids, param = tokenizer.encode_chat(prompt), "messages"
    _check_length(len(ids), sampling.max_tokens, limits, param, which)
    return ids


def _check_length(
    prompt_tokens: int, max_tokens: int, limits: Limits, param: str, which: str
) -> None:
    if limits.max_context is None or prompt_tokens + max_tokens <= limits.max_context:
        return
    raise RequestError(
        f"{which}this model's maximum context length is {limits.max_context} tokens, but the "
        f"request has {prompt_tokens} prompt tokens plus max_tokens={max_tokens} "
        f"({prompt_tokens + max_tokens} in all); shorten the prompt or lower max_tokens",
        param,
    )


# --- fields ---------------------------------------------------------------------------------


_TYPE_NAMES: dict[type, str] = {
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "an array",
    dict: "an object",
    type(None): "null",
}


def _kind(value: object) -> str:
    """The JSON type of a value, for messages."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(body: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """body[name] if it is a `kind` (bool is no int), the default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise RequestError(f"{name} must be {_TYPE_NAMES[kind]}, got {_kind(value)}", name)
    return value


def _check_model(body: Mapping[str, Any], served: str) -> None:
    model = _optional(body, "model", str, served)
    if model != served:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {served!r}",
            "model",
            code=ErrorCode.MODEL_NOT_FOUND,
        )


# OpenAI parameters Cake does not implement, with the value that means "not used"
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "suffix": ("",),
    "tools": ([],),
    "tool_choice": ("none",),
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "top_logprobs": (0,),
    "min_tokens": (0,),
}


def _check_unsupported(body: Mapping[str, Any]) -> None:
    for name, unused in UNSUPPORTED.items():
        value = body.get(name)
        if value is not None and value not in unused:
            raise RequestError(f"{name} is not supported by this server; leave it out", name)
    for name in ("n", "best_of"):
        count = _optional(body, name, int, 1)
        if count != 1:
            raise RequestError(f"{name}={count} is not supported; Cake returns one choice", name)
    if _optional(body, "echo", bool, False):
        raise RequestError("echo is not supported; leave it out or set it to false", "echo")
    logprobs = body.get("logprobs")
    if logprobs is not None and logprobs is not False:
        raise RequestError("logprobs are not supported; leave logprobs out", "logprobs")


def _is_token_id(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _prompts(body: Mapping[str, Any]) -> tuple[str | TokenIds, ...]:
    """The prompt: a string or token ids, or a list of up to MAX_PROMPTS of them."""
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError("prompt is required", "prompt")
    if not isinstance(prompt, list) or _is_token_list(prompt):
        return (_one_prompt(prompt, ""),)
    if not 1 <= len(prompt) <= MAX_PROMPTS:
        raise RequestError(
            f"prompt must be a string, token ids or a list of 1 to {MAX_PROMPTS} of them, "
            f"got a list of {len(prompt)}",
            "prompt",
        )
    several = len(prompt) > 1
    return tuple(_one_prompt(p, f"prompt[{i}] " if several else "") for i, p in enumerate(prompt))


def _is_token_list(prompt: Any) -> bool:
    return isinstance(prompt, list) and bool(prompt) and all(_is_token_id(i) for i in prompt)


def _one_prompt(prompt: Any, which: str) -> str | TokenIds:
    if _is_token_list(prompt):
        if min(prompt) < 0:
            raise RequestError(f"{which or 'prompt '}token ids must not be negative", "prompt")
        return TokenIds(tuple(prompt))
    if not isinstance(prompt, str):
        raise RequestError(
            f"{which or 'prompt '}must be a string or a list of token ids, got {_kind(prompt)}",
            "prompt",
        )
    if not prompt:
        raise RequestError(f"{which or 'prompt '}is empty; send at least one character", "prompt")
    return prompt


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "an empty array" if messages == [] else _kind(messages)
        raise RequestError(
            f"messages must be a non-empty array of {{role, content}} objects, got {got}",
            "messages",
        )
    return tuple(_message(i, m) for i, m in enumerate(messages))


def _message(index: int, message: object) -> ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise RequestError(f"{where} must be an object with role and content", where)
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise RequestError(f"{where}.role must be one of {', '.join(CHAT_ROLES)}", f"{where}.role")
    return {"role": role, "content": _content(message.get("content"), f"{where}.content")}


def _content(content: object, where: str) -> str:
    """A string, or an array of text parts ({"type": "text", "text": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
            for p in content
        ]
        if all(isinstance(t, str) for t in texts):
            return "".join(str(t) for t in texts)
    raise RequestError(
        f"{where} must be a string or an array of text parts, got {_kind(content)}", where
    )


def _sampling(body: Mapping[str, Any], max_tokens_field: str, limit: int) -> Sampling:
    max_tokens = _optional(body, max_tokens_field, int, min(Sampling.max_tokens, limit))
    if not 1 <= max_tokens <= limit:
        raise RequestError(
            f"{max_tokens_field} must be between 1 and {limit}, got {max_tokens}", max_tokens_field
        )
    seed = _optional(body, "seed", int, None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError("seed must fit in a signed 64-bit integer", "seed")
    numbers = {
        name: _number(body, name, getattr(Sampling, name))
        for name in (
            "temperature", "top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"
        )
    }  # fmt: skip
    sampling = Sampling(max_tokens=max_tokens, seed=seed, logit_bias=_logit_bias(body), **numbers)
    _check_sampling(sampling)
    return sampling


def _check_sampling(sampling: Sampling, vocab_size: int | None = None) -> None:
    if problem := sampling.problem(vocab_size):
        name, message = problem
        raise RequestError(message, name)


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """logit_bias: an object from token ids (as strings, JSON's keys) to biases."""
    bias: dict[str, Any] = _optional(body, "logit_bias", dict, {})
    pairs = []
    for key, value in bias.items():
        number = _is_int(value) or isinstance(value, float)
        if not key.isdecimal() or not number or not abs(value) < 1e300:
            raise RequestError(
                f"logit_bias must map token ids to numbers, got {key!r}: {value!r}", "logit_bias"
            )
        pairs.append((int(key), float(value)))
    if len({token for token, _ in pairs}) < len(pairs):
        raise RequestError('logit_bias names a token twice (as "1" and "01")', "logit_bias")
    return tuple(pairs)


def _number(body: Mapping[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if _is_int(value) or isinstance(value, float):
        number = float(value) if abs(value) < 1e300 else math.inf
        if math.isfinite(number):
            return number
    raise RequestError(f"{name} must be a finite number, got {value!r}", name)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(
            f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop"
        )
    return tuple(stops)


def _salt(body: Mapping[str, Any]) -> str:
    salt: str = _optional(body, "cache_salt", str, "")
    if len(salt) > MAX_SALT_CHARS:
        raise RequestError(
            f"cache_salt must be at most {MAX_SALT_CHARS} characters, got {len(salt)}",
            "cache_salt",
        )
    if salt.startswith(TENANT_SALT_PREFIX):  # a tenant's space is named by its key, not a salt
        raise RequestError(f"cache_salt may not start with {TENANT_SALT_PREFIX}", "cache_salt")
    return salt


def _kv_mode(body: Mapping[str, Any]) -> KvMode:
    mode: str = _optional(body, "kv_mode", str, KvMode.CAKE)
    if mode not in tuple(KvMode):
        raise RequestError(f"kv_mode must be one of {', '.join(KvMode)}, got {mode!r}", "kv_mode")
    return KvMode(mode)
