"""Domain events of the inference platform and the RabbitMQ topology they travel on.

Nothing here imports a broker, database or cache client: events are plain data.
"""

from events.model import (
    TERMINAL_EVENTS,
    Event,
    EventDecodeError,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    decode_event,
    encode_event,
    new_event_id,
)

__all__ = [
    "TERMINAL_EVENTS",
    "Event",
    "EventDecodeError",
    "InferenceCancelled",
    "InferenceCompleted",
    "InferenceExpired",
    "InferenceFailed",
    "InferenceRejected",
    "InferenceRequested",
    "InferenceStarted",
    "decode_event",
    "encode_event",
    "new_event_id",
]
