"""The reference models on a real tritonserver, through the platform's gRPC client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tokenizers import Tokenizer
from tritonclient.grpc import InferInput

from ml_service.client import InferenceOutput, ModelInputError, TritonClient, TritonTimeout
from ml_service.launcher import TritonProcess
from tests.support.triton import triton_server

pytestmark = pytest.mark.integration
__all__ = ["triton_server"]  # the session fixture, imported for this module

TOKENIZER = Path(__file__).resolve().parents[2] / "triton_models" / "basic-model" / "1" / "tokenizer.json"


@pytest.fixture(scope="module")
def wordpiece() -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(TOKENIZER))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@pytest.fixture(scope="module")
async def client(triton_server: TritonProcess) -> AsyncIterator[TritonClient]:
    triton = TritonClient(triton_server.grpc_url, timeout_s=30)
    yield triton
    await triton.close()


def expected(tokenizer: Tokenizer, prompt: str, max_tokens: int) -> InferenceOutput:
    """The documented computation, from the tokenizer itself."""
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    text = tokenizer.decode(ids[:max_tokens])
    completion = len(tokenizer.encode(text, add_special_tokens=False).ids)
    return InferenceOutput(text=text, prompt_tokens=len(ids), completion_tokens=completion)


async def test_seed_prompt_is_echoed_with_real_token_counts(client: TritonClient, wordpiece: Tokenizer) -> None:
    out = await client.infer("basic-model", "test prompt", 128, request_id="seed-1")
    assert out == InferenceOutput(text="test prompt", prompt_tokens=2, completion_tokens=2)
    assert out == expected(wordpiece, "test prompt", 128)


async def test_completion_is_the_prompts_first_max_tokens_wordpieces(
    client: TritonClient, wordpiece: Tokenizer
) -> None:
    prompt = "Héllo, Wörld! Tokenizers split unbelievably long words."
    out = await client.infer("basic-model", prompt, 10)
    # Lower-cased, accents stripped, cut after 10 pieces: "un ##bel" of "unbelievably".
    assert out.text == "hello, world! tokenizers split unbel"
    assert out.prompt_tokens == len(wordpiece.encode(prompt, add_special_tokens=False).ids) == 16
    assert out.completion_tokens == len(wordpiece.encode(out.text, add_special_tokens=False).ids) == 10
    assert out == expected(wordpiece, prompt, 10)


async def test_traceparent_header_and_request_id_are_accepted(client: TritonClient) -> None:
    headers = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    out = await client.infer("basic-model", "traced prompt", 2, headers=headers, request_id="req-42")
    assert out.text == "traced prompt"


async def test_concurrent_requests_are_all_answered_correctly(client: TritonClient, wordpiece: Tokenizer) -> None:
    cases = [(f"request number {i} asks about {'batching ' * (i % 7)}and tokens", 1 + i % 9) for i in range(48)]
    outs = await asyncio.gather(*(client.infer("basic-model", p, n) for p, n in cases))
    assert list(outs) == [expected(wordpiece, p, n) for p, n in cases]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "message"),
    [
        ("", 4, "non-empty"),
        ("   \n\t", 4, "non-empty"),
        ("a fine prompt", 0, "max_tokens must be >= 1"),
        ("a fine prompt", -3, "max_tokens"),
        ("x" * 131_073, 4, "over the limit"),
    ],
)
async def test_invalid_input_is_a_permanent_model_input_error(
    client: TritonClient, prompt: str, max_tokens: int, message: str
) -> None:
    with pytest.raises(ModelInputError, match=message) as caught:
        await client.infer("basic-model", prompt, max_tokens)
    assert caught.value.transient is False


async def test_an_invalid_request_fails_alone_among_concurrent_valid_ones(client: TritonClient) -> None:
    calls = [client.infer("basic-model", "good prompt", 1) for _ in range(8)]
    calls.insert(4, client.infer("basic-model", "bad", 0))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[4], ModelInputError)
    assert [r for i, r in enumerate(results) if i != 4] == [InferenceOutput("good", 2, 1)] * 8


async def test_unknown_model_is_a_model_input_error(client: TritonClient) -> None:
    with pytest.raises(ModelInputError, match="unknown model"):
        await client.infer("no-such-model", "hello", 4)


async def test_readiness_of_server_and_models(client: TritonClient) -> None:
    assert await client.is_ready()
    assert await client.is_ready("basic-model")
    assert await client.is_ready("slow-model")
    assert not await client.is_ready("no-such-model")


async def test_slow_model_past_the_client_timeout_is_a_triton_timeout(triton_server: TritonProcess) -> None:
    impatient = TritonClient(triton_server.grpc_url, timeout_s=0.5)
    try:
        with pytest.raises(TritonTimeout) as caught:
            await impatient.infer("slow-model", "wait for me", 4)
        assert caught.value.transient is True
    finally:
        await impatient.close()


def _text(prompts: list[str]) -> InferInput:
    tensor = InferInput("text_input", [len(prompts), 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[p.encode()] for p in prompts], dtype=np.object_))
    return tensor


async def test_raw_contract_batched_request_and_default_max_tokens(
    triton_server: TritonProcess, wordpiece: Tokenizer
) -> None:
    """Straight tritonclient, as a vLLM/TRT-LLM user would call it: a [3, 1] batch, no max_tokens."""
    long_prompt = " ".join(f"word{i}" for i in range(200))
    prompts = ["first prompt", "Second, longer prompt!", long_prompt]
    raw = grpcclient.InferenceServerClient(triton_server.grpc_url)
    try:
        result = await raw.infer("basic-model", [_text(prompts)], client_timeout=30)
    finally:
        await raw.close()
    texts = [t.decode() for t in result.as_numpy("text_output").reshape(-1)]
    prompt_tokens = result.as_numpy("prompt_tokens")
    assert result.as_numpy("text_output").shape == (3, 1)
    assert prompt_tokens.dtype == np.int32
    wanted = [expected(wordpiece, p, 128) for p in prompts]  # config default_max_tokens = 128
    assert texts == [w.text for w in wanted]
    assert prompt_tokens.reshape(-1).tolist() == [w.prompt_tokens for w in wanted]
    assert result.as_numpy("completion_tokens").reshape(-1).tolist() == [w.completion_tokens for w in wanted]
    assert wanted[2].completion_tokens == 128 < wanted[2].prompt_tokens
