"""basic-model: the platform's reference model (Triton Python backend). NOT a language model.

Contract (the LLM tensor names of Triton's vLLM / TensorRT-LLM backends):
  in:  text_input  BYTES [1]   the prompt (UTF-8)
       max_tokens  INT32 [1]   optional; default: the ``default_max_tokens`` config parameter
  out: text_output        BYTES [1]  the completion
       prompt_tokens      INT32 [1]  WordPiece tokens in the prompt
       completion_tokens  INT32 [1]  WordPiece tokens in the completion

What it computes (deterministic and cheap, see README.md): the completion is the prompt's first
``max_tokens`` WordPiece tokens (all-MiniLM-L6-v2 tokenizer, no special tokens) decoded back to
text, so it is the prompt normalised (lower-cased, accents stripped) and cut to ``max_tokens``.
Token counts come from that real tokenizer.

Invalid input (empty prompt, max_tokens < 1, prompt over ``max_prompt_bytes``, bad UTF-8) fails
that request alone with INVALID_ARG; the other requests of the batch are answered.

Config parameters: ``tokenizer`` (path relative to the version folder), ``default_max_tokens``,
``max_prompt_bytes``, ``delay_seconds`` (sleep before answering each batch; the slow-model uses it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


class InvalidInput(ValueError):
    """The request's input breaks the contract: a permanent error for that request."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


def load_tokenizer(path: str) -> Tokenizer:
    tokenizer = Tokenizer.from_file(path)
    # tokenizer.json ships with padding and truncation to 128 for embeddings; counts need neither.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def decode_prompt(raw: object, max_prompt_bytes: int) -> str:
    if not isinstance(raw, bytes | bytearray):
        raw = str(raw).encode("utf-8")
    if len(raw) > max_prompt_bytes:
        raise InvalidInput(f"text_input is {len(raw)} bytes, over the limit of {max_prompt_bytes}")
    try:
        prompt = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"text_input is not valid UTF-8: {exc}") from None
    if not prompt.strip():
        raise InvalidInput("text_input must be a non-empty prompt")
    return prompt


def check_max_tokens(value: int) -> int:
    if value < 1:
        raise InvalidInput(f"max_tokens must be >= 1, got {value}")
    return value


def complete(tokenizer: Tokenizer, prompts: list[str], max_tokens: list[int]) -> list[Completion]:
    """The reference computation for a batch of valid prompts (pure, deterministic)."""
    encoded = tokenizer.encode_batch(prompts, add_special_tokens=False)
    heads = [enc.ids[:limit] for enc, limit in zip(encoded, max_tokens, strict=True)]
    texts = tokenizer.decode_batch(heads, skip_special_tokens=False)
    # Count the completion as the tokenizer sees the returned text, so usage matches the output.
    counted = tokenizer.encode_batch(texts, add_special_tokens=False)
    return [
        Completion(text=text, prompt_tokens=len(enc.ids), completion_tokens=len(out.ids))
        for text, enc, out in zip(texts, encoded, counted, strict=True)
    ]


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        tokenizer_path = os.path.normpath(os.path.join(version_dir, _parameter(config, "tokenizer", "tokenizer.json")))
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.default_max_tokens = int(_parameter(config, "default_max_tokens", "128"))
        self.max_prompt_bytes = int(_parameter(config, "max_prompt_bytes", "131072"))
        self.delay_s = float(_parameter(config, "delay_seconds", "0"))

    def _read(self, request: pb_utils.InferenceRequest) -> tuple[list[str], list[int]]:
        text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        prompts = [decode_prompt(raw, self.max_prompt_bytes) for raw in text]
        tensor = pb_utils.get_input_tensor_by_name(request, "max_tokens")
        if tensor is None:
            limits = [self.default_max_tokens] * len(prompts)
        else:
            limits = [check_max_tokens(int(v)) for v in tensor.as_numpy().reshape(-1)]
        if len(limits) != len(prompts):
            raise InvalidInput(f"max_tokens has {len(limits)} values for {len(prompts)} prompts")
        return prompts, limits

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        if self.delay_s > 0:
            time.sleep(self.delay_s)
        # Read every request first; an invalid one fails alone.
        parsed: list[tuple[list[str], list[int]] | InvalidInput] = []
        for request in requests:
            try:
                parsed.append(self._read(request))
            except InvalidInput as exc:
                parsed.append(exc)
        # Tokenize all valid rows of the batch in one call.
        prompts = [p for item in parsed if not isinstance(item, InvalidInput) for p in item[0]]
        limits = [m for item in parsed if not isinstance(item, InvalidInput) for m in item[1]]
        results = iter(complete(self.tokenizer, prompts, limits)) if prompts else iter(())
        responses = []
        for item in parsed:
            if isinstance(item, InvalidInput):
                error = pb_utils.TritonError(str(item), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            rows = [next(results) for _ in item[0]]
            responses.append(pb_utils.InferenceResponse(output_tensors=_outputs(rows)))
        return responses

    def finalize(self) -> None:
        self.tokenizer = None


def _outputs(rows: list[Completion]) -> list[pb_utils.Tensor]:
    shape = (len(rows), 1)
    texts = np.array([r.text.encode("utf-8") for r in rows], dtype=np.object_).reshape(shape)
    prompt = np.array([r.prompt_tokens for r in rows], dtype=np.int32).reshape(shape)
    completion = np.array([r.completion_tokens for r in rows], dtype=np.int32).reshape(shape)
    return [
        pb_utils.Tensor("text_output", texts),
        pb_utils.Tensor("prompt_tokens", prompt),
        pb_utils.Tensor("completion_tokens", completion),
    ]
