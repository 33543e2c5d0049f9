"""The RabbitMQ topology as data: the one source of truth for exchange, queue and routing-key names.

Publishers, consumers, the DLQ tooling, the AsyncAPI document and the KEDA manifests all
derive their names from here (a test checks the Kubernetes manifests against it).

Routing keys: ``inference.<kind>.<model>.<user_id>``, e.g. ``inference.completed.basic-model.alice``.
A client can therefore bind its own queue to ``inference.completed.*.alice`` (one user's outcomes),
``inference.*.basic-model.#`` (one model) or ``inference.#`` (everything).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Final

from events.model import (
    TERMINAL_EVENTS,
    Event,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
)
from events.request_rules import IDENTIFIER

EVENTS_EXCHANGE: Final = "mlp.events"  # durable topic exchange carrying every domain event
DEAD_LETTER_EXCHANGE: Final = "mlp.dead-letter"  # durable direct exchange; key = source queue name
PROJECTIONS_QUEUE: Final = "mlp.projections"
WEBHOOKS_QUEUE: Final = "mlp.webhooks"
REQUESTS_QUEUE_PREFIX: Final = "mlp.requests."
DLQ_SUFFIX: Final = ".dlq"
# RabbitMQ 3.10 has no default delivery limit: without one a poison message loops forever.
DELIVERY_LIMIT: Final = 5

EVENT_KINDS: Final[dict[type[Event], str]] = {
    InferenceRequested: "requested",
    InferenceStarted: "started",
    InferenceCompleted: "completed",
    InferenceFailed: "failed",
    InferenceRejected: "rejected",
    InferenceCancelled: "cancelled",
    InferenceExpired: "expired",
}
# The outcome kinds: the terminal events of events.model, whatever types that set grows to.
OUTCOME_KINDS: Final[tuple[str, ...]] = tuple(EVENT_KINDS[t] for t in TERMINAL_EVENTS)


def routing_key(event: Event) -> str:
    return f"inference.{EVENT_KINDS[type(event)]}.{event.model}.{event.user_id}"


def requested_routing_key(model: str, user_id: str) -> str:
    return f"inference.requested.{model}.{user_id}"


@dataclass(frozen=True)
class QueueSpec:
    """A durable quorum queue, its bindings on an exchange and its arguments."""

    name: str
    exchange: str
    binding_keys: tuple[str, ...]
    dead_letter_queue: str | None = None
    arguments: dict[str, str | int] = field(default_factory=dict)
    # True: only the queue's consumer binds it (mlp.bus.declare_own_queue); the other services declare the
    # queue and its DLQ but leave its bindings out, so their RabbitMQ users need no read on its binding keys.
    consumer_binds: bool = False


def _work_queue(name: str, binding_keys: tuple[str, ...]) -> QueueSpec:
    return QueueSpec(
        name=name,
        exchange=EVENTS_EXCHANGE,
        binding_keys=binding_keys,
        dead_letter_queue=name + DLQ_SUFFIX,
        arguments={
            "x-queue-type": "quorum",
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
            "x-dead-letter-routing-key": name,
            # at-least-once dead-lettering: a dead letter is not lost if the DLQ is briefly unavailable.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        },
    )


def requests_queue(model: str) -> QueueSpec:
    """The work queue of one served model, consumed by that model's ML workers."""
    return _work_queue(REQUESTS_QUEUE_PREFIX + model, (f"inference.requested.{model}.#",))


def projections_queue() -> QueueSpec:
    """Every domain event, consumed by the results collector (projections)."""
    return _work_queue(PROJECTIONS_QUEUE, ("inference.#",))


def webhooks_queue() -> QueueSpec:
    """The outcomes of the users who have a webhook, consumed by the webhook dispatcher, which alone binds
    it, per user (``webhook_binding_keys``; a worker's or collector's user may not bind outcome keys:
    docs/kubernetes.md). Declared without bindings: a user without webhooks sends nothing here."""
    return dataclasses.replace(_work_queue(WEBHOOKS_QUEUE, ()), consumer_binds=True)


def webhook_binding_keys(user_id: str) -> tuple[str, ...]:
    """The binding keys of ``mlp.webhooks`` for one user with a webhook: each outcome kind, any model."""
    # A validated identifier (events.request_rules): no dot, star or hash, so exactly this user's keys.
    if not IDENTIFIER.match(user_id):
        raise ValueError(f"not a user id: {user_id[:200]!r}")
    return tuple(f"inference.{kind}.*.{user_id}" for kind in OUTCOME_KINDS)


def dead_letter_queue(source: QueueSpec) -> QueueSpec:
    assert source.dead_letter_queue is not None
    return QueueSpec(
        name=source.dead_letter_queue,
        exchange=DEAD_LETTER_EXCHANGE,
        binding_keys=(source.name,),
        arguments={"x-queue-type": "quorum"},
    )


# The requests queues' bound (MLP_MAX_QUEUED_PER_MODEL) is a policy, not a queue argument: RabbitMQ refuses to
# redeclare a quorum queue with other arguments, and a policy changes on a live queue without a redeclare.
REQUESTS_BOUND_POLICY: Final = "mlp-requests-bound"
# Every model's request queue (model names: events.request_rules.MODEL_NAME_PATTERN), never its DLQ
# (``mlp.requests.<model>.dlq``: a dot is outside the alphabet) nor any other queue.
REQUESTS_BOUND_PATTERN: Final = r"^mlp\.requests\.[A-Za-z0-9_-]{1,64}$"
# The highest-priority policy matching a queue is its only one (RabbitMQ applies one policy per queue, keys
# are not merged): above the default 0, so an operator's catch-all policy does not drop the bound. Set
# queue-wide keys (say a max-length-bytes) in this policy's definition too, or as an operator policy.
REQUESTS_BOUND_PRIORITY: Final = 10


@dataclass(frozen=True)
class QueuePolicy:
    """A RabbitMQ policy of one vhost: ``rabbitmqctl set_policy -p VHOST --apply-to queues --priority P NAME
    PATTERN DEFINITION`` (or PUT /api/policies/VHOST/NAME on the management API)."""

    name: str
    pattern: str
    definition: dict[str, str | int]
    priority: int = 0
    apply_to: str = "queues"


def requests_bound_policy(max_queued: int) -> QueuePolicy:
    """Each model's request queue holds at most ``max_queued`` ready messages; a publish past it is refused
    (``basic.nack`` to a confirming publisher), never dropped. RabbitMQ 3.10 quorum queues support both keys
    (``overflow`` drop-head or reject-publish); unacknowledged (in-flight) messages do not count."""
    if max_queued < 1:
        raise ValueError(f"max_queued must be at least 1, got {max_queued}")
    return QueuePolicy(
        name=REQUESTS_BOUND_POLICY,
        pattern=REQUESTS_BOUND_PATTERN,
        definition={"max-length": max_queued, "overflow": "reject-publish"},
        priority=REQUESTS_BOUND_PRIORITY,
    )


def all_queues(models: tuple[str, ...]) -> list[QueueSpec]:
    work = [projections_queue(), webhooks_queue(), *(requests_queue(m) for m in models)]
    return work + [dead_letter_queue(q) for q in work]
