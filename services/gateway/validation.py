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


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request; `prompt` is a string or token ids (completions) or chat messages."""

    endpoint: Endpoint
    prompt: str | TokenIds | tuple[ChatMessage, ...]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    cache_salt: str = ""
    kv_mode: KvMode = KvMode.CAKE


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
    prompt: str | TokenIds | tuple[ChatMessage, ...]
    if endpoint is Endpoint.COMPLETIONS:
        prompt, max_tokens_field = _prompt(body), "max_tokens"
    else:
        prompt = _messages(body)
        legacy = body.get("max_tokens") is not None or body.get("max_completion_tokens") is None
        max_tokens_field = "max_tokens" if legacy else "max_completion_tokens"
    return ParsedRequest(
        endpoint=endpoint,
        prompt=prompt,
        sampling=_sampling(body, max_tokens_field, limits.max_tokens_limit),
        stop=_stop(body),
        stream=_optional(body, "stream", bool, False),
        cache_salt=_salt(body),
        kv_mode=_kv_mode(body),
    )


def tokenize(parsed: ParsedRequest, tokenizer: Tokenizer, limits: Limits) -> list[int]:
    """The prompt's token ids; RequestError when they and max_tokens overflow the context."""
    if isinstance(parsed.prompt, str):
        ids, param = tokenizer.encode(parsed.prompt), "prompt"
    elif isinstance(parsed.prompt, TokenIds):
        ids, param = list(parsed.prompt.ids), "prompt"
        if max(ids) >= tokenizer.vocab_size:
            raise RequestError(
                f"prompt token ids must be below the vocabulary size {tokenizer.vocab_size}, "
                f"got {max(ids)}",
                "prompt",
            )
    else:
        ids, param = tokenizer.encode_chat(parsed.prompt), "messages"
    _check_length(len(ids), parsed.sampling.max_tokens, limits, param)
    return ids


def _check_length(prompt_tokens: int, max_tokens: int, limits: Limits, param: str) -> None:
    if limits.max_context is None or prompt_tokens + max_tokens <= limits.max_context:
        return
    raise RequestError(
        f"this model's maximum context length is {limits.max_context} tokens, but the request "
        f"has {prompt_tokens} prompt tokens plus max_tokens={max_tokens} "
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
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "repetition_penalty": (1, 1.0),
    "logit_bias": ({},),
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


def _prompt(body: Mapping[str, Any]) -> str | TokenIds:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and all(_is_token_id(i) for i in prompt):
        prompt = TokenIds(tuple(prompt))
    elif isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
        if isinstance(prompt, list) and prompt and all(_is_token_id(i) for i in prompt):
            prompt = TokenIds(tuple(prompt))
    elif isinstance(prompt, list):
        raise RequestError(
            f"prompt must be one prompt (a string or a list of token ids); a list of prompts "
            f"is accepted only with exactly one, got {len(prompt)} items",
            "prompt",
        )
    if prompt is None:
        raise RequestError("prompt is required", "prompt")
    if isinstance(prompt, TokenIds):
        if min(prompt.ids) < 0:
            raise RequestError("prompt token ids must not be negative", "prompt")
        return prompt
    if not isinstance(prompt, str):
        raise RequestError(
            f"prompt must be a string or a list of token ids, got {_kind(prompt)}", "prompt"
        )
    if not prompt:
        raise RequestError("prompt is empty; send at least one character", "prompt")
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
    temperature = _number(body, "temperature", Sampling.temperature)
    if not 0 <= temperature <= 2:
        raise RequestError(f"temperature must be between 0 and 2, got {temperature}", "temperature")
    top_p = _number(body, "top_p", Sampling.top_p)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _optional(body, "seed", int, None)
    if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise RequestError("seed must fit in a signed 64-bit integer", "seed")
    return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)


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
