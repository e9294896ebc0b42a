"""The gateway's OpenAPI document (served at /openapi.json): what clients may send, what comes
back. Its request schemas say what validation.py accepts; a fuzzer in the tests sends what they
allow, and what they do not, and expects no 5xx."""

from __future__ import annotations

from typing import Any

from services.gateway.validation import (
    CHAT_ROLES,
    MAX_PROMPTS,
    MAX_SALT_CHARS,
    MAX_STOP_STRINGS,
    SEED_RANGE,
    Limits,
)
from shared.core.request import (
    BIAS_RANGE,
    MAX_LOGIT_BIAS,
    PENALTY_RANGE,
    REPETITION_PENALTY_RANGE,
    KvMode,
)

JSON = "application/json"
ERROR_STATUSES = {
    "400": "The request is invalid (the error names the field)",
    "401": "An API key is required, or the one given is unknown",
    "404": "No such model",
    "413": "The body is too large",
    "415": "The body is not JSON",
    "429": "The server is busy (Retry-After says when to try again)",
    "503": "A service is not answering (or the model is not loaded yet)",
    "504": "No answer within the request deadline",
}


def _sampling(limits: Limits, max_tokens_field: str) -> dict[str, Any]:
    """The sampling and Cake fields both endpoints take."""
    return {
        "model": {"type": "string", "enum": [limits.model_name]},
        max_tokens_field: {"type": "integer", "minimum": 1, "maximum": limits.max_tokens_limit},
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "exclusiveMinimum": True, "maximum": 1},
        "seed": {"type": "integer", "minimum": SEED_RANGE[0], "maximum": SEED_RANGE[1]},
        "presence_penalty": _between(PENALTY_RANGE),
        "frequency_penalty": _between(PENALTY_RANGE),
        "repetition_penalty": _between(REPETITION_PENALTY_RANGE),
        "logit_bias": {
            "type": "object",
            "maxProperties": MAX_LOGIT_BIAS,
            "propertyNames": {"pattern": "^[0-9]+$"},
            "additionalProperties": _between(BIAS_RANGE),
        },
        "stop": {"oneOf": [{"type": "string", "minLength": 1}, _stops()]},
        "stream": {"type": "boolean"},
        "cache_salt": {"type": "string", "maxLength": MAX_SALT_CHARS},
        "kv_mode": {"type": "string", "enum": list(KvMode)},
    }


def _between(bounds: tuple[float, float]) -> dict[str, Any]:
    return {"type": "number", "minimum": bounds[0], "maximum": bounds[1]}


def _stops() -> dict[str, Any]:
    items = {"type": "string", "minLength": 1}
    return {"type": "array", "maxItems": MAX_STOP_STRINGS, "items": items}


def _token_ids(vocab_size: int) -> dict[str, Any]:
    items = {"type": "integer", "minimum": 0, "maximum": vocab_size - 1}
    return {"type": "array", "minItems": 1, "items": items}


def _body(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"required": True, "content": {JSON: {"schema": schema}}}


def _responses(ok: str) -> dict[str, Any]:
    error = {"$ref": "#/components/schemas/Error"}
    found: dict[str, Any] = {"200": {"description": ok, "content": {JSON: {"schema": {}}}}}
    for status, description in ERROR_STATUSES.items():
        found[status] = {"description": description, "content": {JSON: {"schema": error}}}
    return found


def openapi_document(limits: Limits, vocab_size: int) -> dict[str, Any]:
    """OpenAPI 3.0 for the gateway serving `limits.model_name` (token ids below vocab_size)."""
    prompt = {
        "oneOf": [
            {"type": "string", "minLength": 1},
            _token_ids(vocab_size),
            {"type": "array", "minItems": 1, "maxItems": MAX_PROMPTS,
             "items": {"oneOf": [{"type": "string", "minLength": 1}, _token_ids(vocab_size)]}},
        ]
    }  # fmt: skip
    part = {
        "type": "object",
        "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
        "required": ["type", "text"],
    }
    message = {
        "type": "object",
        "properties": {
            "role": {"type": "string", "enum": list(CHAT_ROLES)},
            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]},
        },
        "required": ["role", "content"],
    }
    completion = _body({"prompt": prompt, **_sampling(limits, "max_tokens")}, ["prompt"])
    chat_fields = {"messages": {"type": "array", "minItems": 1, "items": message}}
    chat = _body({**chat_fields, **_sampling(limits, "max_completion_tokens")}, ["messages"])
    bearer: list[dict[str, list[str]]] = [{"bearer": []}]
    return {
        "openapi": "3.0.3",
        "info": {"title": "Cake", "version": "1", "description": "OpenAI-compatible API"},
        "paths": {
            "/v1/completions": {"post": {
                "operationId": "completions", "requestBody": completion, "security": bearer,
                "responses": _responses("A text completion (an SSE stream when stream is true)"),
            }},
            "/v1/chat/completions": {"post": {
                "operationId": "chat_completions", "requestBody": chat, "security": bearer,
                "responses": _responses("A chat completion (an SSE stream when stream is true)"),
            }},
            "/v1/models": {"get": {
                "operationId": "models", "security": bearer,
                "responses": _responses("The served model"),
            }},
            "/health": {"get": {
                "operationId": "health",
                "responses": {"200": {"description": "Requests would be served"},
                              "503": {"description": "They would not; the reason says why"}},
            }},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {
                "type": "object", "required": ["error"],
                "properties": {"error": {
                    "type": "object", "required": ["message", "type", "code"],
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                   "param": {"type": "string", "nullable": True},
                                   "code": {"type": "string"}},
                }},
            }},
        },
    }  # fmt: skip
