"""The AsyncAPI contract: committed == regenerated, valid AsyncAPI 3.0, and true to the wire format.

Validity is checked with jsonschema against the official AsyncAPI 3.0.0 JSON Schema, vendored in
``docs/schemas/`` (from the ``@asyncapi/specs`` package, Apache-2.0; no PyPI package ships it).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import msgspec
import pytest
import yaml

from events.model import (
    InferenceRequested,
    decode_event,
    encode_event,
    new_event_id,
    utc_now,
)
from events.topology import EVENT_KINDS, EVENTS_EXCHANGE, REQUESTS_QUEUE_PREFIX
from ops import docs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_SCHEMA = ROOT / "docs" / "schemas" / "asyncapi-3.0.0.schema.json"


@pytest.fixture(scope="module")
def generated() -> str:
    return docs.render("yaml")


@pytest.fixture(scope="module")
def contract(generated: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(generated)
    return loaded


@pytest.fixture(scope="module")
def asyncapi_validator() -> jsonschema.Draft7Validator:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _payload_validator(contract: dict[str, Any], message: str) -> jsonschema.Draft202012Validator:
    ref = contract["components"]["messages"][message]["payload"]["$ref"]
    return jsonschema.Draft202012Validator({"$ref": ref, "components": contract["components"]})


def test_committed_document_equals_the_regenerated_one(generated: str) -> None:
    committed = COMMITTED.read_text(encoding="utf-8")
    assert committed == generated, "docs/asyncapi.yaml is out of date: run `mlp docs gen`"
    assert docs.main(["check", "--file", str(COMMITTED)]) == 0


def test_faststream_cli_generates_the_same_document(tmp_path: Path, generated: str) -> None:
    out = tmp_path / "asyncapi.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    env = {k: v for k, v in env.items() if not k.startswith("MLP_")}
    faststream = Path(sys.executable).with_name("faststream")
    result = subprocess.run(
        [str(faststream), "docs", "gen", "ops.docs:app", "--yaml", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == generated


def test_document_is_valid_asyncapi_3(contract: dict[str, Any], asyncapi_validator: jsonschema.Draft7Validator) -> None:
    errors = [f"{e.json_path}: {e.message[:200]}" for e in asyncapi_validator.iter_errors(contract)]
    assert errors == []
    assert contract["asyncapi"] == "3.0.0"


def test_the_validator_catches_a_broken_document(
    contract: dict[str, Any], asyncapi_validator: jsonschema.Draft7Validator
) -> None:
    broken = copy.deepcopy(contract)
    broken["operations"]["requests"]["action"] = "publish"  # AsyncAPI 2 wording: not valid in 3.0
    del broken["info"]["version"]
    assert len(list(asyncapi_validator.iter_errors(broken))) >= 2


def test_every_channel_message_and_schema_users_rely_on_is_named(contract: dict[str, Any]) -> None:
    events = {t.__name__ for t in EVENT_KINDS}
    assert set(contract["components"]["messages"]) == events
    assert events <= set(contract["components"]["schemas"])
    channels = contract["channels"]
    assert set(channels) == {"requests"} | {f"inference.{kind}" for kind in EVENT_KINDS.values() if kind != "requested"}
    for name, channel in channels.items():
        assert channel["address"].endswith(".{model}.{user_id}"), name
        assert set(channel["parameters"]) == {"model", "user_id"}
        (message,) = channel["messages"]
        kind = channel["address"].split(".")[1]
        assert {t.__name__: k for t, k in EVENT_KINDS.items()}[message] == kind
    # Requests: the worker's queue (generated from its own subscriber); outcomes: the topic exchange.
    requests = channels["requests"]["bindings"]["amqp"]
    assert requests["queue"]["name"] == REQUESTS_QUEUE_PREFIX + "{model}"
    assert requests["queue"]["durable"] is True
    assert contract["operations"]["requests"]["action"] == "receive"
    for kind in ("started", "completed", "failed", "rejected"):
        binding = channels[f"inference.{kind}"]["bindings"]["amqp"]
        assert binding["exchange"]["name"] == EVENTS_EXCHANGE
        assert binding["exchange"]["type"] == "topic"
        operation = contract["operations"][f"inference.{kind}"]
        assert operation["action"] == "send"
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2  # persistent
        assert operation["bindings"]["amqp"]["mandatory"] is True


def test_message_examples_and_real_events_match_the_payload_schemas(contract: dict[str, Any]) -> None:
    for name, message in contract["components"]["messages"].items():
        validator = _payload_validator(contract, name)
        for example in message["examples"]:
            validator.validate(example["payload"])
            event = decode_event(json.dumps(example["payload"]))  # the schema and the decoder agree
            assert type(event).__name__ == name
    fresh = InferenceRequested(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id="schema-test",
        model="basic-model",
        prompt="hello",
        max_tokens=4,
        source="bus",
    )
    _payload_validator(contract, "InferenceRequested").validate(msgspec.json.decode(encode_event(fresh)))


def test_the_request_schema_names_the_fields_a_publisher_must_fill(contract: dict[str, Any]) -> None:
    schema = contract["components"]["schemas"]["InferenceRequested"]
    assert set(schema["required"]) == {
        "type",
        "event_id",
        "request_id",
        "occurred_at",
        "user_id",
        "model",
        "prompt",
        "max_tokens",
    }
    assert schema["properties"]["occurred_at"]["format"] == "date-time"
    validator = _payload_validator(contract, "InferenceRequested")
    example = contract["components"]["messages"]["InferenceRequested"]["examples"][0]["payload"]
    for field in ("request_id", "event_id", "occurred_at"):
        incomplete = {k: v for k, v in example.items() if k != field}
        assert not validator.is_valid(incomplete), field
    assert not validator.is_valid({**example, "user_id": "has.dots"})  # ids travel in routing keys


async def test_the_document_is_served_over_http(generated: str) -> None:
    app = docs.docs_http_app(docs.document())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://docs") as client:
        as_yaml = await client.get("/asyncapi.yaml")
        assert as_yaml.status_code == 200
        assert as_yaml.text == generated
        as_json = await client.get("/asyncapi.json")
        assert as_json.json() == yaml.safe_load(generated)
        page = await client.get("/")
        assert page.status_code == 200
        assert "asyncapi" in page.text.lower()
