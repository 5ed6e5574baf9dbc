"""Soft masks on a model instance (method.md §1 "Masks", Eq. 2).

A head's mask multiplies its q, k and v channels (so a masked head flattens its softmax, which CIT corrects);
a neuron's mask multiplies its activation after the nonlinearity (the input of the MLP output projection).
Which channels a unit's mask scales is data (:mod:`comp_vlm.adapters.units`); this module holds the buffer and
hook plumbing. Mask values live in non-persistent buffers on the attention / MLP module; the hooks are small
callable objects that read those buffers, so ``copy.deepcopy`` of a model re-targets them at the copy's own
buffers.
"""

from __future__ import annotations

import torch
from torch import nn


def remove_hooks(module: nn.Module, types: tuple[type, ...]) -> None:
    """Remove the hooks of the given callable types from ``module``. Identifying hooks by type (not by handle)
    also works on deep copies, whose handles nobody holds."""
    for registry in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, hook in registry.items() if isinstance(hook, types)]:
            del registry[key]
            for extra in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)


def has_hook(module: nn.Module, types: tuple[type, ...]) -> bool:
    return any(isinstance(h, types) for h in (*module._forward_hooks.values(), *module._forward_pre_hooks.values()))


def set_mask_buffer(owner: nn.Module, name: str, values: torch.Tensor) -> None:
    if name in owner._buffers:
        owner._buffers[name] = values
    else:
        owner.register_buffer(name, values, persistent=False)


def clear_mask_buffer(owner: nn.Module, name: str) -> None:
    owner._buffers.pop(name, None)
