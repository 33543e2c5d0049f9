"""FastStream's bus metrics are labelled by event kind, never by the user a routing key names."""

from __future__ import annotations

import pytest

from mlp.telemetry.bus_metrics import bounded_routing_key


@pytest.mark.parametrize(
    ("routing_key", "label"),
    [
        ("inference.completed.basic-model.alice", "inference.completed"),
        ("inference.requested.basic-model.user:42@x", "inference.requested"),
        ("inference.failed", "inference.failed"),
        ("mlp.requests.basic-model", "mlp.requests.basic-model"),  # a dead letter's key: its queue
        ("", ""),
    ],
)
def test_bounded_routing_key(routing_key: str, label: str) -> None:
    assert bounded_routing_key(routing_key) == label
