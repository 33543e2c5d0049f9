"""Counting a prompt's tokens with its model's own tokenizer (the registry's ``TokenizerSpec``).

The gateway and the worker count where a model limits its input in tokens (``ModelSpec.max_input_tokens``),
so an over-long prompt is refused before it is queued (and, from the bus, before it reaches Triton).
Models without such a limit are not counted: their usage is the count the model itself answers.
Tokenizers are loaded once, when the counter is made (a missing file fails the service's start).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer

from events.registry import ModelSpec, TokenizerSpec
from ml_service.launcher import default_model_repository


def load_tokenizer(spec: TokenizerSpec, repository: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(repository / spec.file))
    # The files pad and truncate for training; a count needs neither.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


class TokenCounter:
    def __init__(self, models: Mapping[str, ModelSpec], repository: Path | None = None) -> None:
        root = repository or default_model_repository()
        self._specs = {name: spec for name, spec in models.items() if spec.max_input_tokens is not None}
        self._tokenizers = {name: load_tokenizer(spec.tokenizer, root) for name, spec in self._specs.items()}

    def count(self, model: str, prompt: str) -> int | None:
        """The prompt's tokens as ``model`` counts them, or None when the model has no token limit."""
        tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            return None
        add_special = self._specs[model].tokenizer.add_special_tokens
        return len(tokenizer.encode(prompt, add_special_tokens=add_special).ids)
