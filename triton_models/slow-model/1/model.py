"""slow-model: basic-model's code, run with the ``delay_seconds`` of this model's config.pbtxt.

It loads ../../basic-model/1/model.py instead of copying it, so the two cannot drift apart.
Fault tests use it to prove the ML worker's Triton timeout (see basic-model/README.md).
"""

from __future__ import annotations

import importlib.util
import os
import sys

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "basic-model", "1", "model.py")
_spec = importlib.util.spec_from_file_location("reference_model_for_slow_model", _SOURCE)
if _spec is None or _spec.loader is None:
    raise ImportError(f"slow-model needs basic-model's code at {_SOURCE}")
_module = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _module  # dataclasses resolve annotations through sys.modules
_spec.loader.exec_module(_module)

TritonPythonModel = _module.TritonPythonModel
