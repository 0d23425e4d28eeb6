"""Assertion helpers shared by the weight-I/O tests."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def same_weights(a: torch.nn.Module | Mapping[str, torch.Tensor], b: torch.nn.Module | Mapping[str, torch.Tensor]) -> bool:
    """True when both hold exactly the same keys and bit-identical tensors (shapes must match too)."""
    a = a.state_dict() if isinstance(a, torch.nn.Module) else a
    b = b.state_dict() if isinstance(b, torch.nn.Module) else b
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
