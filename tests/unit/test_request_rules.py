"""The request rules (events.request_rules): one check, and one alphabet per id that every schema applies."""

from __future__ import annotations

import msgspec
import pydantic
import pytest

from api_gateway.schemas import InferenceSubmit
from events.model import InferenceRequested, utc_now
from events.request_rules import (
    IDENTIFIER,
    MODEL_NAME,
    Rejection,
    RequestLimits,
    check_max_tokens_per_request,
    check_model,
    check_prompt_text,
    check_request,
)

LIMITS = RequestLimits(
    models=frozenset({"basic-model", "another-model"}), max_prompt_chars=100, max_tokens_limit=50, default_max_tokens=16
)


def check(**changes: object) -> Rejection | None:
    fields: dict[str, object] = {"model": "basic-model", "prompt": "hello", "max_tokens": 16, "limits": LIMITS}
    fields.update(changes)
    return check_request(**fields)  # type: ignore[arg-type]


def test_a_request_within_the_limits_passes_and_the_bounds_are_inclusive() -> None:
    assert check() is None
    assert check(prompt="x" * 100, max_tokens=50) is None
    assert check(prompt="x", max_tokens=1) is None


@pytest.mark.parametrize(
    ("changes", "reason", "needle"),
    [
        ({"model": "no-such-model"}, "unknown_model", "unknown model 'no-such-model'"),
        ({"prompt": ""}, "invalid_request", "empty"),
        ({"prompt": "a\x00b"}, "invalid_request", "NUL"),
        ({"prompt": "x" * 101}, "prompt_too_large", "prompt has 101 characters; the limit is 100"),
        ({"max_tokens": 0}, "invalid_request", "at least 1"),
        ({"max_tokens": 51}, "max_tokens_too_large", "max_tokens is 51; the limit is 50"),
    ],
)
def test_each_rule_answers_with_its_reason_and_a_message(changes: dict[str, object], reason: str, needle: str) -> None:
    rejection = check(**changes)
    assert rejection is not None
    assert rejection.reason == reason
    assert needle in rejection.message


def test_the_first_broken_rule_answers() -> None:
    # An unknown model beats an oversized prompt; an oversized prompt beats too many tokens.
    assert check(model="nope", prompt="x" * 101) == check_model("nope", LIMITS.models)
    rejection = check(prompt="x" * 101, max_tokens=51)
    assert rejection is not None
    assert rejection.reason == "prompt_too_large"


def test_the_unknown_model_message_names_the_served_models_in_order() -> None:
    rejection = check_model("nope", LIMITS.models)
    assert rejection == Rejection(
        "unknown_model", "unknown model 'nope'; this platform serves: another-model, basic-model"
    )
    assert check_model("basic-model", LIMITS.models) is None


def test_a_plans_per_request_ceiling_applies_only_when_known() -> None:
    planned = RequestLimits(
        models=LIMITS.models,
        max_prompt_chars=100,
        max_tokens_limit=50,
        default_max_tokens=16,
        max_tokens_per_request=20,
    )
    assert check(max_tokens=21) is None
    rejection = check(max_tokens=21, limits=planned)
    assert rejection is not None
    assert rejection.reason == "max_tokens_too_large"
    assert rejection.message == "max_tokens 21 exceeds the plan's limit of 20 per request"
    assert check(max_tokens=20, limits=planned) is None


def test_the_per_request_ceiling_names_the_plan_when_known() -> None:
    assert check_max_tokens_per_request(600, 600, "free") is None
    rejection = check_max_tokens_per_request(601, 600, "free")
    assert rejection == Rejection(
        "max_tokens_too_large", "max_tokens 601 exceeds the free plan's limit of 600 per request"
    )


def test_max_tokens_defaults_to_the_configured_value() -> None:
    assert LIMITS.effective_max_tokens(None) == 16
    assert LIMITS.effective_max_tokens(7) == 7


def test_the_prompt_text_rule_alone() -> None:
    assert check_prompt_text("fine") is None
    nul = check_prompt_text("\x00")
    assert nul is not None
    assert nul.reason == "invalid_request"


def _event_accepts(user_id: str, model: str) -> bool:
    event = InferenceRequested(
        event_id="e-1", request_id="r-1", occurred_at=utc_now(), user_id="u", model="m", prompt="p", max_tokens=1
    )
    body = msgspec.json.encode(msgspec.structs.replace(event, user_id=user_id, model=model))
    try:
        msgspec.json.decode(body, type=InferenceRequested)
    except msgspec.ValidationError:
        return False
    return True


def _body_accepts(user_id: str, model: str) -> bool:
    try:
        InferenceSubmit(prompt="p", user_id=user_id, model=model)
    except pydantic.ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    ("user_id", "accepted"),
    [("alice", True), ("user:42@tenant_a-b", True), ("x" * 128, True), ("x" * 129, False), ("a.b", False),
     ("a b", False), ("a*", False), ("", False)],
)  # fmt: skip
def test_the_event_and_the_http_body_accept_the_same_user_ids(user_id: str, accepted: bool) -> None:
    assert (IDENTIFIER.fullmatch(user_id) is not None) is accepted
    assert _event_accepts(user_id, "basic-model") is accepted
    assert _body_accepts(user_id, "basic-model") is accepted


@pytest.mark.parametrize(
    ("model", "accepted"),
    [("basic-model", True), ("m_1", True), ("x" * 64, True), ("x" * 65, False), ("a:b", False), ("a.b", False)],
)
def test_the_event_and_the_http_body_accept_the_same_model_names(model: str, accepted: bool) -> None:
    assert (MODEL_NAME.fullmatch(model) is not None) is accepted
    assert _event_accepts("alice", model) is accepted
    assert _body_accepts("alice", model) is accepted


def test_the_http_body_refuses_a_nul_with_the_rules_message() -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        InferenceSubmit(prompt="a\x00b", user_id="alice", model="basic-model")
    expected = check_prompt_text("a\x00b")
    assert expected is not None
    assert expected.message in str(caught.value)
