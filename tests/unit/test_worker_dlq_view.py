"""``mlp dlq``'s pure parts: what a dead letter shows, and the headers a replay carries."""

from __future__ import annotations

from ops.dlq import REPLAY_HEADER, dead_letter_queues, describe, original_routing_key, replay_headers

DEATH = {
    "x-death": [
        {
            "count": 1,
            "reason": "rejected",
            "queue": "mlp.requests.basic-model",
            "exchange": "mlp.events",
            "routing-keys": ["inference.requested.basic-model.alice"],
        }
    ],
    "x-first-death-reason": "rejected",
    "x-delivery-count": 5,
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
}


def test_the_original_routing_key_comes_from_the_newest_death() -> None:
    assert original_routing_key(DEATH) == "inference.requested.basic-model.alice"
    assert original_routing_key({}) is None
    assert original_routing_key({"x-death": "junk"}) is None


def test_a_dead_letter_is_described_without_trusting_its_body() -> None:
    letter = describe("mlp.requests.basic-model.dlq", DEATH, b'{"type":"InferenceRequested","request_id":"r1"}')
    assert (letter.reason, letter.count, letter.request_id, letter.type) == ("rejected", 1, "r1", "InferenceRequested")
    odd = describe("q", {}, b"\x1b[2J" + b"x" * 500)
    assert "\x1b" not in odd.preview
    assert "+" in odd.preview  # says how much was cut
    assert odd.request_id == "?"


def test_a_replay_drops_the_broker_headers_and_counts_itself() -> None:
    headers = replay_headers(DEATH)
    assert "x-death" not in headers
    assert "x-delivery-count" not in headers
    assert headers["traceparent"] == DEATH["traceparent"]
    assert headers[REPLAY_HEADER] == 1
    assert replay_headers(headers)[REPLAY_HEADER] == 2


def test_the_default_queues_are_the_dead_letter_queues() -> None:
    assert dead_letter_queues(("basic-model",)) == [
        "mlp.projections.dlq",
        "mlp.webhooks.dlq",
        "mlp.requests.basic-model.dlq",
    ]
