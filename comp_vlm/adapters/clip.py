"""Adapter for Hugging Face ``CLIPModel`` (vision tower: mode P_v / T_v; text tower: P_l / T_l).

Instance-level forwards (no class patch): each tower's ``encoder.forward`` carries a :class:`TokenState` through
the layers and scatters the surviving tokens back to their original positions at the end, so CLIP's own pooling
(vision CLS at 0, text EOS by input ids) reads the right token; each layer's ``forward`` runs attention, its token
site, then the MLP. A pre-hook on the text model records the padding mask and the pooled EOS position of the call.
"""

from __future__ import annotations

from types import MethodType
from typing import Any

import torch
from torch import nn
from transformers import CLIPModel
from transformers.modeling_outputs import BaseModelOutput

from .. import masks, tokens
from ..tokens import TokenState
from .base import ModelAdapter, TowerSpec, register_adapter
from .runtime import LayerCall, end_tower, label_pools
from .units import UnitSpec, attention_heads, mask_buffer, mlp_neurons

CLIP_KEYS = "self_attn.k_proj"  # a layer's key projection (the merge reducer compares its output)


def clip_units(heads: int, head_dim: int, neurons: int) -> tuple[UnitSpec, ...]:
    """A CLIP encoder layer's prunable units: self-attention heads and MLP neurons."""
    q_k_v = (("self_attn.q_proj", 1), ("self_attn.k_proj", 1), ("self_attn.v_proj", 1))
    return (
        attention_heads("self_attn", q_k_v, "self_attn.out_proj", head_dim, heads, count_attrs=("num_heads",)),
        mlp_neurons("mlp", ("mlp.fc1",), "mlp.fc2", neurons),
    )


def clip_pooled_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where CLIPTextModel pools: the highest id when ``eos_token_id == 2`` (legacy rule), else the first EOS."""
    ids = input_ids.to(torch.int)
    if eos_token_id == 2:
        return ids.argmax(dim=-1).long()
    return (ids == eos_token_id).int().argmax(dim=-1).long()


class TextCallHook:
    """Forward pre-hook (with kwargs) on CLIPTextModel: hands the call's padding mask and pooled positions to the
    encoder forward through a transient attribute that the encoder pops."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if input_ids is None:
            return
        input_ids = input_ids.view(-1, input_ids.shape[-1])
        pooled = clip_pooled_positions(input_ids, module.eos_token_id)
        # causal tower: tokens after the pooled EOS (padding, with or without an attention mask) cannot reach it
        valid = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] <= pooled[:, None]
        if attention_mask is not None:
            valid = valid & attention_mask.view(input_ids.shape).bool()
        module.encoder.__dict__["_comp_call"] = (valid, pooled)
        return


def clip_encoder_forward(self: nn.Module, inputs_embeds: torch.Tensor, attention_mask=None, **kwargs) -> BaseModelOutput:
    """Instance forward of CLIPEncoder: layers exchange a TokenState; output scattered to full length."""
    call = self.__dict__.pop("_comp_call", None)
    b, n = inputs_embeds.shape[:2]
    valid, pooled = call if call is not None else (None, None)
    if valid is not None and valid.shape != (b, n):
        valid, pooled = None, None
    first = torch.zeros(b, n, dtype=torch.bool, device=inputs_embeds.device)
    first[:, 0] = True
    state = label_pools(self.layers, TokenState.start(b, n, inputs_embeds.device, valid=valid, pooled=pooled,
                                                      always_kept=first))
    hidden = inputs_embeds
    for layer in self.layers:
        hidden, state = layer(hidden, attention_mask, comp_state=state, **kwargs)
    end_tower(self.layers)
    return BaseModelOutput(last_hidden_state=tokens.scatter_to_full(hidden, state))


def _clip_layer_body(
    self: nn.Module, hidden: torch.Tensor, attention_mask, comp_state: TokenState, comp_call: LayerCall, **kwargs,
) -> tuple[torch.Tensor, TokenState]:
    """CLIPEncoderLayer's maths; its SiteRuntime runs the protocol after attention, at the site, after the MLP."""
    attn = self.self_attn
    head_mask = getattr(attn, mask_buffer("head"), None)
    n_heads = attn.q_proj.out_features // attn.head_dim
    step = self.comp_runtime.start(self, comp_state, comp_call, n_heads, head_mask)
    x = self.layer_norm1(hidden)
    if n_heads == 0:
        attn_out, probs = attn.out_proj(x.new_zeros(*x.shape[:-1], 0)), None
    else:
        attn_out, probs = attn(hidden_states=x, attention_mask=step.attention_mask(attention_mask),
                               comp_need_probs=step.need_probs, **kwargs)
    step.after_attention(probs)
    hidden = step.site(hidden + attn_out)
    hidden = hidden + self.mlp(self.layer_norm2(hidden))
    return hidden, step.after_mlp()


def clip_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, comp_state=None, **kwargs):
    """Instance forward of CLIPEncoderLayer: attention -> token site -> MLP; keeps gradient checkpointing."""
    if comp_state is None:  # called outside the comp-vlm encoder: behave like the class
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    return self.comp_runtime.run(self, _clip_layer_body, hidden_states, attention_mask, comp_state, **kwargs)


def clip_tower_spec(name: str, sub: Any, param_mode: str, token_mode: str | None, causal: bool,
                    layers_path: str) -> TowerSpec:
    """The TowerSpec of a CLIP encoder stack of sub-config ``sub`` (CLIP's towers, LLaVA's vision tower)."""
    head_dim = sub.hidden_size // sub.num_attention_heads
    return TowerSpec(name=name, param_mode=param_mode, token_mode=token_mode, layers_path=layers_path,
                     num_heads=sub.num_attention_heads, head_dim=head_dim, hidden=sub.hidden_size,
                     neurons=sub.intermediate_size, causal=causal,
                     units=clip_units(sub.num_attention_heads, head_dim, sub.intermediate_size))


def clip_patch_embedding(vision_config: Any, image_size: int) -> tuple[int, int]:
    """(patches, FLOPs of the patch convolution) of a CLIP vision tower at ``image_size``."""
    vc = vision_config
    patches = (image_size // vc.patch_size) ** 2
    return patches, 2 * patches * vc.num_channels * vc.patch_size**2 * vc.hidden_size


def install_clip_tower(encoder: nn.Module) -> None:
    """Install the instance forwards of a CLIPEncoder (:func:`clip_encoder_forward`) and of its layers (each layer
    runs through the ``comp_runtime`` :meth:`ModelAdapter.install` gives it)."""
    encoder.forward = MethodType(clip_encoder_forward, encoder)
    for layer in encoder.layers:
        layer.forward = MethodType(clip_layer_forward, layer)


def uninstall_clip_tower(encoder: nn.Module) -> None:
    """Restore the class forwards of a CLIPEncoder and its layers."""
    encoder.__dict__.pop("forward", None)
    encoder.__dict__.pop("_comp_call", None)
    for layer in encoder.layers:
        layer.__dict__.pop("forward", None)


@register_adapter
class CLIPAdapter(ModelAdapter):
    family = "clip"
    model_classes = (CLIPModel,)
    auto_classes = ("AutoModel", "AutoModelForZeroShotImageClassification")
    supports_dead_compute = True
    token_reducers = ("drop", "fuse", "merge")
    key_projection = CLIP_KEYS

    def _tower_modules(self) -> dict[str, nn.Module]:
        return {"vision": self.model.vision_model, "text": self.model.text_model}

    def tower_specs(self) -> list[TowerSpec]:
        """The vision tower (P_v, T_v) and the causal text tower (P_l, T_l)."""
        cfg = self.model.config
        return [clip_tower_spec(name, sub, pmode, tmode, causal, f"{name}_model.encoder.layers")
                for name, sub, pmode, tmode, causal in (("vision", cfg.vision_config, "P_v", "T_v", False),
                                                        ("text", cfg.text_config, "P_l", "T_l", True))]

    def default_reference(self) -> dict:
        """The config's image size and 16 text tokens (at most the position table's length)."""
        cfg = self.model.config
        return {"image_size": cfg.vision_config.image_size, "text_length": min(16, cfg.text_config.max_position_embeddings)}

    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        """Vision: patches + CLS (kept), patch embedding and projection; text: the tokens (BOS and EOS kept) and
        the projection."""
        cfg = self.model.config
        proj = cfg.projection_dim
        if spec.name == "vision":
            patches, patch_embed = clip_patch_embedding(cfg.vision_config, int(reference["image_size"]))
            return patches + 1, 1, patch_embed + 2 * cfg.vision_config.hidden_size * proj
        length = int(reference["text_length"])
        return length, min(2, length), 2 * cfg.text_config.hidden_size * proj

    def _install_forward(self) -> None:
        """Each tower's encoder and layer forwards, and the text model's :class:`TextCallHook`."""
        for spec in self.tower_specs():
            install_clip_tower(self._tower_modules()[spec.name].encoder)
        text = self.model.text_model
        if not masks.has_hook(text, (TextCallHook,)):
            text.register_forward_pre_hook(TextCallHook(), with_kwargs=True)

    def _uninstall_forward(self) -> None:
        """Undo :meth:`_install_forward`."""
        for spec in self.tower_specs():
            uninstall_clip_tower(self._tower_modules()[spec.name].encoder)
        masks.remove_hooks(self.model.text_model, (TextCallHook,))
