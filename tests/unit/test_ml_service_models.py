"""The model repository's files: the slow-model keeps basic-model's contract, and paths resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2] / "triton_models"


def _config(model: str) -> str:
    return (REPO / model / "config.pbtxt").read_text()


def _contract(config: str) -> str:
    """The input and output declarations: from ``input [`` up to the next comment."""
    declarations = config[config.index("input [") :]
    return declarations[: declarations.index("\n#")]


def _parameter(config: str, key: str) -> str:
    found = re.search(rf'key: "{key}" value: {{ string_value: "([^"]*)" }}', config)
    assert found, key
    return found.group(1)


def test_slow_model_has_the_same_tensor_contract_as_basic_model() -> None:
    assert _contract(_config("slow-model")) == _contract(_config("basic-model"))


@pytest.mark.parametrize("model", ["basic-model", "slow-model"])
def test_config_names_the_folder_batches_dynamically_and_finds_its_tokenizer(model: str) -> None:
    config = _config(model)
    assert f'name: "{model}"' in config
    batch = re.search(r"max_batch_size: (\d+)", config)
    assert batch
    assert int(batch.group(1)) > 0
    assert "max_queue_delay_microseconds" in config
    assert (REPO / model / "1" / _parameter(config, "tokenizer")).resolve().is_file()
    assert (REPO / model / "1" / "model.py").is_file()


def test_only_the_slow_model_waits() -> None:
    assert float(_parameter(_config("basic-model"), "delay_seconds")) == 0
    assert float(_parameter(_config("slow-model"), "delay_seconds")) > 0


def test_tokenizer_ships_with_its_licence_notice() -> None:
    notice = (REPO / "basic-model" / "1" / "NOTICE").read_text()
    assert "all-MiniLM-L6-v2" in notice
    assert "Apache License, Version 2.0" in notice
    assert "NOT a language model" in (REPO / "basic-model" / "1" / "model.py").read_text()
    assert "not a language model" in (REPO / "basic-model" / "README.md").read_text()
