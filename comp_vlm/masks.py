"""Soft masks on a model instance (method.md §1 "Masks", Eq. 2).

A head's mask multiplies its q, k and v channels (so a masked head flattens its softmax, which CIT corrects);
a neuron's mask multiplies its activation after the nonlinearity (the input of the MLP output projection).
Mask values live in non-persistent buffers on the attention / MLP module; the hooks are small callable objects
that read those buffers, so ``copy.deepcopy`` of a model re-targets them at the copy's own buffers.
"""

from __future__ import annotations

import torch
from torch import nn

HEAD_MASK = "comp_head_mask"
NEURON_MASK = "comp_neuron_mask"


class HeadMaskHook:
    """Forward hook on a per-head projection (q, k, v, or a fused qkv with ``repeats`` = 3)."""

    def __init__(self, owner: nn.Module, head_dim: int, repeats: int = 1) -> None:
        self.owner = owner
        self.head_dim = head_dim
        self.repeats = repeats

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        mask = getattr(self.owner, HEAD_MASK, None)
        if mask is None:
            return output
        scale = mask.to(output.dtype).repeat_interleave(self.head_dim)
        if self.repeats > 1:
            scale = scale.repeat(self.repeats)
        return output * scale


class NeuronMaskHook:
    """Forward pre-hook on the MLP output projection: scales its input (the activated neurons)."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        mask = getattr(self.owner, NEURON_MASK, None)
        if mask is None:
            return args
        return (args[0] * mask.to(args[0].dtype), *args[1:])


_HOOK_TYPES = (HeadMaskHook, NeuronMaskHook)


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


def remove_mask_hooks(module: nn.Module) -> None:
    remove_hooks(module, _HOOK_TYPES)


def has_mask_hook(module: nn.Module) -> bool:
    return has_hook(module, _HOOK_TYPES)


def set_mask_buffer(owner: nn.Module, name: str, values: torch.Tensor) -> None:
    if name in owner._buffers:
        owner._buffers[name] = values
    else:
        owner.register_buffer(name, values, persistent=False)


def clear_mask_buffer(owner: nn.Module, name: str) -> None:
    owner._buffers.pop(name, None)
