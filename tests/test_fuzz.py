"""The gateway fuzzed from its own OpenAPI document (schemathesis): requests the schema allows and
requests it does not, against the whole stack as processes. The rule: no 5xx, no answer later
than the request deadline, every service still alive."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from services.launcher.nats_server import free_port
from services.launcher.stack import LocalStack
from shared.runtime.config import Settings

REQUEST_TIMEOUT_S = 20.0
EXAMPLES = 120  # per generation mode, across the operations: bounded, so CI stays short


@pytest.fixture(scope="module")
def fuzzed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    settings_ = Settings(
        port=free_port(), metrics_port=0, store=str(tmp / "store"),
        staging_dir=str(tmp / "staging"), chunk_tokens=64, log_level="error",
        max_tokens_limit=8, request_timeout_s=REQUEST_TIMEOUT_S,
    ).validated()  # fmt: skip
    stack = LocalStack(settings_)
    try:
        stack.start()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def api_schema(fuzzed_stack: LocalStack) -> Any:
    with urllib.request.urlopen(f"{fuzzed_stack.url}/openapi.json", timeout=5) as resp:
        document = json.load(resp)
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=fuzzed_stack.url)
    return schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_the_gateway_never_answers_5xx(
    api_schema: Any, fuzzed_stack: LocalStack, mode: GenerationMode
) -> None:
    """Requests the schema allows (positive) and breaks (negative), for every operation.
    (Drawn from schemathesis's strategies with hypothesis directly: its pytest plugin does not
    run under this pytest.)"""
    operations = [op.ok() for op in api_schema.get_all_operations()]
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations])

    @given(cases)
    @settings(
        max_examples=EXAMPLES, deadline=None, database=None,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    def answered_without_5xx(case: Any) -> None:
        response = case.call(timeout=REQUEST_TIMEOUT_S + 10)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])
        if response.status_code >= 400 and case.operation.path != "/health":
            error = response.json()["error"]
            assert error["message"] and error["code"], response.text[:500]
        fuzzed_stack.check_alive()  # RuntimeError naming a service that died

    answered_without_5xx()
