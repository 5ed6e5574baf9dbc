"""Transformer plumbing shared by the adapters: the ``comp_vlm`` attention implementation (the token-site runtime
lives in :mod:`comp_vlm.adapters.runtime`).

The attention function runs transformers' sdpa for every module except where a layer asks for attention
probabilities (an active token site, statistics collection); there it runs eager attention and returns them.
Registered once, by name, in transformers' ``AttentionInterface`` (and the sdpa mask builder under the same name,
without which ``create_causal_mask`` silently returns no mask at all); selected per model instance through
``config._attn_implementation`` -- no class is patched.

Proportional attention (ToMe; the ``merge`` reducer): a key that stands for ``s`` tokens gets ``log s`` added to its
logits (:func:`proportional_bias`), so it weighs as its ``s`` tokens would. The bias rides on the additive mask the
layer passes, so sdpa, eager and the probabilities this module returns all see it.
"""

from __future__ import annotations

import torch
from torch import nn

COMP_ATTENTION = "comp_vlm"
_registered = False


def eager_attention_with_probs(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention returning (output (B, n, H, d), probabilities (B, H, n, n))."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : key.shape[-2]]
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        else:
            logits = logits + mask
    elif is_causal and query.shape[-2] > 1:
        q, k = query.shape[-2], key.shape[-2]
        allowed = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    probs_used = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs_used, value).transpose(1, 2).contiguous()
    return out, probs


def proportional_bias(mask: torch.Tensor | None, size: torch.Tensor) -> torch.Tensor | None:
    """The additive mask (B, 1, n, n) with ``log(size)`` (size (B, n): the tokens each key stands for) added on the
    key axis; ``mask`` itself, untouched, while every size is 1. A ``None`` mask needs a dtype: give a zero one."""
    if bool((size == 1).all()):
        return mask
    if mask is None:
        raise ValueError("proportional attention needs an additive mask of the attention's dtype (zeros for none)")
    return mask + size.log().to(mask.dtype)[:, None, None, :]


def comp_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    comp_need_probs: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """sdpa, or eager with probabilities where the caller passed ``comp_need_probs=True``."""
    if comp_need_probs:
        return eager_attention_with_probs(
            module, query, key, value, attention_mask, scaling, dropout, kwargs.get("is_causal")
        )
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register_comp_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(COMP_ATTENTION, comp_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(COMP_ATTENTION, sdpa_mask)
    _registered = True


def use_comp_attention(model: nn.Module) -> None:
    """Switch a model instance from sdpa to ``comp_vlm`` attention (eager and others are left alone)."""
    register_comp_attention()
    if getattr(model.config, "_attn_implementation", None) in (None, "sdpa"):
        model.set_attn_implementation(COMP_ATTENTION)


def restore_sdpa(model: nn.Module) -> None:
    if getattr(model.config, "_attn_implementation", None) == COMP_ATTENTION:
        model.set_attn_implementation("sdpa")
