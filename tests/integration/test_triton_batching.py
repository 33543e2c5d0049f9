"""TritonCaller against the real Triton: concurrent requests share batched calls, an invalid one fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

import pytest

from events.model import InferenceRequested
from ml_service.client import InferenceOutput, Row, TritonClient
from ml_service.launcher import TritonProcess
from ml_worker.decide import Succeeded, TritonFailed
from ml_worker.inference import TritonCaller
from tests.integration.test_worker_harness import requested
from tests.support.triton import triton_server

pytestmark = pytest.mark.integration

__all__ = ["triton_server"]  # the session fixture, imported for this module


class CountingClient(TritonClient):
    """The real client, counting the calls it makes and the rows they carry."""

    def __init__(self, url: str) -> None:
        super().__init__(url, timeout_s=30)
        self.calls: list[int] = []

    async def infer_batch(
        self,
        model: str,
        rows: Sequence[Row],
        *,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> list[InferenceOutput]:
        self.calls.append(len(rows))
        return await super().infer_batch(model, rows, headers=headers, request_id=request_id)


@pytest.fixture
async def client(triton_server: TritonProcess) -> AsyncIterator[CountingClient]:
    triton = CountingClient(triton_server.grpc_url)
    yield triton
    await triton.close()


def request(prompt: str, max_tokens: int = 3) -> InferenceRequested:
    return requested(user_id="batching-user", prompt=prompt, max_tokens=max_tokens)


async def test_requests_of_one_turn_share_a_call_and_get_their_own_answers(client: CountingClient) -> None:
    caller = TritonCaller(client, concurrency=4, retries=0, backoff_s=0.1, max_batch=16)
    requests = [request(f"prompt number {i} " + "word " * (i % 5), max_tokens=1 + i % 4) for i in range(40)]

    outcomes = await asyncio.gather(*(caller.infer(r) for r in requests))

    assert client.calls == [16, 16, 8]
    for r, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, Succeeded)
        alone = await client.infer("basic-model", r.prompt, r.max_tokens)
        assert (outcome.text, outcome.prompt_tokens, outcome.completion_tokens) == (
            alone.text,
            alone.prompt_tokens,
            alone.completion_tokens,
        )


async def test_an_invalid_request_fails_alone_in_its_batch(client: CountingClient) -> None:
    caller = TritonCaller(client, concurrency=4, retries=0, backoff_s=0.1)
    requests = [request("a good prompt") for _ in range(6)]
    requests.insert(3, request("   "))  # the model refuses a blank prompt (INVALID_ARG)

    outcomes = await asyncio.gather(*(caller.infer(r) for r in requests))

    assert isinstance(outcomes[3], TritonFailed)
    assert outcomes[3].error_code == "invalid_input"
    assert all(isinstance(o, Succeeded) and o.text == "a good prompt" for i, o in enumerate(outcomes) if i != 3)
    assert client.calls[0] == 7  # the batch first, then each row alone
    assert sorted(client.calls[1:]) == [1] * 7
