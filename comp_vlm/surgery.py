"""Physical removal of units from ``nn.Linear`` layers, shared by every adapter."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    with warnings.catch_warnings():  # a fully pruned layer has zero-element weights; their init is a no-op anyway
        warnings.simplefilter("ignore", UserWarning)
        layer = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(weight.requires_grad)
    return layer


def slice_linear_out(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """Keep output rows ``keep`` (weight rows and bias entries)."""
    keep = keep.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.detach()[keep]
    return _new_linear(linear.weight.detach()[keep], bias)


def slice_linear_in(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    """Keep input columns ``keep`` (the bias is untouched)."""
    keep = keep.to(linear.weight.device)
    bias = None if linear.bias is None else linear.bias.detach()
    return _new_linear(linear.weight.detach()[:, keep], bias)


def block_channels(units: torch.Tensor, width: int, repeats: int = 1, stride: int = 0) -> torch.Tensor:
    """Channel indices of ``units`` in a projection laid out unit after unit in blocks of ``width`` channels
    (a head: head_dim; a neuron: 1); ``repeats`` copies at offset ``stride`` (a fused [q|k|v] projection has
    repeats=3, stride=H*head_dim)."""
    base = (units.long()[:, None] * width + torch.arange(width)[None, :]).reshape(-1)
    return torch.cat([base + r * stride for r in range(repeats)])


def get_submodule_parent(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def replace_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, name = get_submodule_parent(root, path)
    setattr(parent, name, new)
