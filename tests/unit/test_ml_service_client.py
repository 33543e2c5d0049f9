"""The client's pure parts: error classification, request tensors, output parsing."""

from __future__ import annotations

import numpy as np
import pytest

from ml_service.client import (
    InferenceOutput,
    ModelInputError,
    ModelOutputError,
    Row,
    TritonClient,
    TritonError,
    TritonServerError,
    TritonTimeout,
    TritonUnavailable,
    build_inputs,
    classify,
    parse_outputs,
)


@pytest.mark.parametrize(
    ("status", "kind", "transient"),
    [
        ("StatusCode.UNAVAILABLE", TritonUnavailable, True),
        ("StatusCode.CANCELLED", TritonUnavailable, True),
        ("StatusCode.RESOURCE_EXHAUSTED", TritonUnavailable, True),
        ("StatusCode.DEADLINE_EXCEEDED", TritonTimeout, True),
        ("StatusCode.INVALID_ARGUMENT", ModelInputError, False),
        ("StatusCode.NOT_FOUND", ModelInputError, False),
        ("StatusCode.INTERNAL", TritonServerError, True),
        ("StatusCode.UNKNOWN", TritonServerError, True),
        (None, TritonServerError, True),
    ],
)
def test_grpc_status_maps_to_an_error_kind(status: str | None, kind: type[TritonError], transient: bool) -> None:
    error = classify(status, "details from Triton")
    assert type(error) is kind
    assert isinstance(error, TritonError)
    assert error.transient is transient
    assert "details from Triton" in str(error)
    if status:
        assert error.code == status.removeprefix("StatusCode.")


def test_inputs_follow_the_llm_tensor_contract() -> None:
    text, limit = build_inputs([Row("héllo", 7)])
    assert (text.name(), text.datatype(), text.shape()) == ("text_input", "BYTES", [1, 1])
    assert (limit.name(), limit.datatype(), limit.shape()) == ("max_tokens", "INT32", [1, 1])


def test_a_batch_is_one_row_per_request() -> None:
    text, limit = build_inputs([Row("a", 1), Row("b", 2), Row("c", 3)])
    assert (text.shape(), limit.shape()) == ([3, 1], [3, 1])
    with pytest.raises(ValueError, match="at least one row"):
        build_inputs([])


@pytest.mark.parametrize("max_tokens", [-1, 2**31])
def test_max_tokens_outside_int32_is_an_input_error(max_tokens: int) -> None:
    with pytest.raises(ModelInputError, match="max_tokens"):
        build_inputs([Row("ok", 1), Row("x", max_tokens)])


def test_outputs_are_read_row_by_row() -> None:
    outs = parse_outputs(
        np.array([["héllo".encode()], [b"two"]], dtype=np.object_),
        np.array([[7], [2]], dtype=np.int32),
        np.array([[3], [1]], dtype=np.int32),
        rows=2,
    )
    assert outs == [InferenceOutput("héllo", 7, 3), InferenceOutput("two", 2, 1)]


def test_missing_or_bad_outputs_are_an_output_error() -> None:
    tokens = np.array([[1]], dtype=np.int32)
    with pytest.raises(ModelOutputError):
        parse_outputs(None, tokens, tokens)
    with pytest.raises(ModelOutputError):
        parse_outputs(np.array([[b"\xff"]], dtype=np.object_), tokens, tokens)
    with pytest.raises(ModelOutputError):
        parse_outputs(np.array([], dtype=np.object_), tokens, tokens)
    with pytest.raises(ModelOutputError, match="fewer"):
        parse_outputs(np.array([[b"one"]], dtype=np.object_), tokens, tokens, rows=2)


def test_a_client_without_a_timeout_is_refused() -> None:
    with pytest.raises(ValueError, match="timeout"):
        TritonClient("127.0.0.1:8001", timeout_s=0)
