"""The API contract: a committed OpenAPI snapshot, and schemathesis fuzzing in-process.

Refresh the snapshot after a deliberate API change with
``BINDSEARCH_UPDATE_OPENAPI=1 pytest tests/test_service_schema.py`` and commit
``tests/openapi.json``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from encoders import Modality
from service import FakeEmbedder, Item, MemorySearcher, ServiceSettings, create_app
from service.generators import FakeGenerator

SNAPSHOT = Path(__file__).with_name("openapi.json")


def _app(root: Path) -> FastAPI:
    (root / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 32)
    items = [
        Item(0, Modality.VISION, "a.png", tags=("x",)),
        Item(1, Modality.AUDIO, None, start=0.0, end=1.0),
        Item(2, Modality.TEXT, "missing.txt", caption="c"),
    ]
    vectors = np.random.default_rng(0).standard_normal((3, 8))
    searcher = MemorySearcher(vectors, items, root)
    return create_app(ServiceSettings(), FakeEmbedder(8), searcher, FakeGenerator(8))


def test_openapi_snapshot(tmp_path: Path) -> None:
    with TestClient(_app(tmp_path)) as c:
        current = c.get("/openapi.json").json()
    if os.environ.get("BINDSEARCH_UPDATE_OPENAPI"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    committed = json.loads(SNAPSHOT.read_text())
    assert current == committed, (
        "the API changed: if on purpose, refresh tests/openapi.json "
        "(BINDSEARCH_UPDATE_OPENAPI=1, see this module's docstring)"
    )


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_api_fuzz(tmp_path: Path, mode: str) -> None:
    """No 5xx, and every answer fits its documented status, content type, headers and schema.

    Each operation gets a bounded number of generated requests (valid ones, then invalid ones).
    """
    app = _app(tmp_path)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # starts the lifespan
    for _ in range(4000):
        if app.state.bindsearch.ready:
            break
        time.sleep(0.005)
    assert app.state.bindsearch.ready
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for op in operations:

        @given(case=op.as_strategy(generation_mode=generation))
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=checks)

        try:
            run()
        except Unsatisfiable:
            # No invalid request exists for an operation without inputs (GET /healthz).
            assert generation is GenerationMode.NEGATIVE, op.label
    seen = app.state.bindsearch.metrics.render().decode()
    for route in (
        "/v1/search",
        "/v1/embed",
        "/v1/embeddings",
        "/v1/items/{item_id}/media",
        "/v1/generate",
    ):
        assert f'route="{route}"' in seen, route  # the fuzzer reached it
