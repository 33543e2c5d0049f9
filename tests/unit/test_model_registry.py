"""The model registry's entries and the rules that read them: per-model limits, the embed task, the
quota's estimate, which models `mlp up` serves, and the client's contract per task."""

from __future__ import annotations

import numpy as np
import pytest

from events.registry import QUICKSTART_MODELS, REGISTRY, UnknownModel, model_spec
from events.request_rules import RequestLimits, check_request
from ml_service.client import ModelOutputError, Row, build_inputs, parse_embeddings
from mlp.settings import Settings
from ops.bench.main import batching_note
from ops.up import served_models
from quota.plans import reservation_estimate

EMBED = "all-minilm-l6-v2"
LIMITS = Settings(models=("basic-model", EMBED)).request_limits()


def test_entries_are_consistent() -> None:
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert spec.queue == f"mlp.requests.{name}"
        assert spec.contract.input_names[0] == "text_input"
        assert "prompt_tokens" in spec.contract.output_names
    embed = REGISTRY[EMBED]
    assert (embed.task, embed.embedding_dimension, embed.max_input_tokens) == ("embed", 384, 256)
    assert embed.contract.output_names == ("embedding", "prompt_tokens")
    assert REGISTRY["basic-model"].contract.output_names == ("text_output", "prompt_tokens", "completion_tokens")
    with pytest.raises(UnknownModel, match="no-such-model"):
        model_spec("no-such-model")


def test_an_embed_request_is_limited_in_tokens_and_ignores_max_tokens() -> None:
    assert check_request(model=EMBED, prompt="hi", max_tokens=10**6, limits=LIMITS, prompt_tokens=256) is None
    rejection = check_request(model=EMBED, prompt="hi", max_tokens=1, limits=LIMITS, prompt_tokens=257)
    assert rejection is not None
    assert rejection.reason == "prompt_too_large"
    assert rejection.message == f"prompt has 257 tokens ({EMBED}'s tokenizer); {EMBED} takes at most 256"
    # Not counted (the caller had no counter): the character limit alone applies.
    assert check_request(model=EMBED, prompt="hi", max_tokens=1, limits=LIMITS) is None
    assert LIMITS.effective_max_tokens(None, EMBED) == LIMITS.effective_max_tokens(500, EMBED) == 1
    # A generate model keeps its max_tokens rules and has no token limit on its input.
    assert LIMITS.max_input_tokens_of("basic-model") is None
    assert LIMITS.effective_max_tokens(None, "basic-model") == 128
    too_many = check_request(model="basic-model", prompt="hi", max_tokens=5000, limits=LIMITS, prompt_tokens=10**6)
    assert too_many is not None
    assert too_many.reason == "max_tokens_too_large"


def test_limits_without_registry_entries_behave_as_before() -> None:
    plain = RequestLimits(models=frozenset({"other"}), max_prompt_chars=10, max_tokens_limit=5, default_max_tokens=2)
    assert plain.effective_max_tokens(None, "other") == 2
    assert check_request(model="other", prompt="x", max_tokens=6, limits=plain, prompt_tokens=99) is not None


def test_the_quota_reserves_an_embeddings_prompt_and_its_special_tokens_only() -> None:
    assert reservation_estimate("abcdef", 10) == 16
    assert reservation_estimate("abcdef", 10, REGISTRY["basic-model"]) == 16
    assert reservation_estimate("abcdef", 1, REGISTRY[EMBED]) == 8  # [CLS] + at most 6 + [SEP]


def test_mlp_up_serves_the_quickstart_models_that_are_installed() -> None:
    assert served_models({}, lambda package: True) == (QUICKSTART_MODELS, "")
    models, note = served_models({}, lambda package: package != "torch")
    assert models == ("basic-model",)
    assert f"not serving {EMBED} (needs torch)" in note
    assert "[models]" in note
    assert served_models({"MLP_MODELS": f" {EMBED} "}, lambda package: False) == ((EMBED,), "")


def test_the_embed_contract_sends_only_the_text() -> None:
    (text,) = build_inputs([Row("a", 1), Row("b", 1)], REGISTRY[EMBED].contract)
    assert (text.name(), text.shape()) == ("text_input", [2, 1])
    assert [t.name() for t in build_inputs([Row("a", 1)], REGISTRY["basic-model"].contract)] == [
        "text_input",
        "max_tokens",
    ]


def test_embeddings_are_read_row_by_row_and_rounded() -> None:
    vectors = np.array([[0.123456789, -0.5], [1.0, 0.0]], dtype=np.float32)
    outs = parse_embeddings(vectors, np.array([[4], [5]], dtype=np.int32), rows=2, dimension=2)
    assert [o.prompt_tokens for o in outs] == [4, 5]
    assert outs[0].embedding == [0.12345679, -0.5]
    assert (outs[1].text, outs[1].completion_tokens, outs[1].embedding) == ("", 0, [1.0, 0.0])
    with pytest.raises(ModelOutputError, match="not 3"):
        parse_embeddings(vectors, np.array([[4], [5]]), rows=2, dimension=3)
    with pytest.raises(ModelOutputError, match="not finite"):
        parse_embeddings(np.array([[np.nan, 0.0]]), np.array([[1]]), rows=1)
    with pytest.raises(ModelOutputError, match="must return"):
        parse_embeddings(None, np.array([[1]]))


def test_the_bench_reports_the_batches_triton_formed() -> None:
    assert batching_note("m", (10, 10), (110, 30)) == (
        "Triton ran 100 requests of m in 20 executions during the load: 5.0 per execution "
        "(Triton's batches; the worker's are on its /metrics)"
    )
    assert batching_note("m", None, (1, 1)) == ""
    assert batching_note("m", (5, 5), (5, 5)) == ""
