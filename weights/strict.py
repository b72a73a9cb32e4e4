"""Strict state-dict loading: key sets and shapes compared, every difference named."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from model.errors import StateDictMismatchError, WeightsError
from weights.layout import require

M = TypeVar("M", bound=nn.Module)


def check_state_dict(what: str, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise StateDictMismatchError naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        (k, tuple(state[k].shape), tuple(expected[k].shape))
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(what, missing, unexpected, mismatched)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file raises WeightsError naming it."""
    require(path, "see docs/weights.md")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from e


def load_strict(what: str, model: M, state: dict[str, torch.Tensor]) -> M:
    check_state_dict(what, model, state)
    model.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise StateDictMismatchError(what, missing=leftovers)
    return model
