"""Adapter for Hugging Face ``SiglipModel`` (vision tower: mode P_v / T_v; text tower: P_l / T_l).

Where SigLIP differs from CLIP:

- the vision tower has no CLS token: an attention-pooling head (``vision_model.head``, a probe query over every
  patch) pools it, so every patch is prunable (``TokenState.start(pooled_token=False)``) and the head reads the kept
  patches alone; its key/value projections count per kept token (:meth:`SiglipAdapter.output_token_flops`);
- the text tower is bidirectional and pools at the last position: batches pad to ``max_length`` (as SigLIP was
  trained, with no attention mask), and a padded batch equals each sample alone at that length;
- the retrieval loss is sigmoid with ``logit_bias`` (:func:`sigmoid_loss`, registered for the retrieval task).

The layers are CLIP's (same module names), run by CLIP's layer forward; ``SiglipAttention`` drops the keyword
arguments it gets, so its instance forward here passes ``comp_need_probs`` on to the attention function.
"""

from __future__ import annotations

from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.siglip.modeling_siglip import eager_attention_forward

from .. import tokens
from ..tasks.retrieval import register_contrastive_loss, similarity_logits
from ..tokens import TokenState
from .base import ModelAdapter, TowerSpec, register_adapter
from .clip import clip_layer_forward, clip_patch_embedding, clip_tower_spec
from .runtime import end_tower, label_pools


def siglip_attention_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, **kwargs):
    """SiglipAttention's forward, passing the keyword arguments (``comp_need_probs``) on to the attention function."""
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q, k, v = (proj(hidden_states).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    out, probs = attention(self, q, k, v, attention_mask, is_causal=False, scaling=self.scale,
                           dropout=self.dropout if self.training else 0.0, **kwargs)
    return self.out_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), probs


def run_layers(layers: nn.ModuleList, hidden: torch.Tensor, mask, state: TokenState, **kwargs,
               ) -> tuple[torch.Tensor, TokenState]:
    """A tower's layers, exchanging ``state`` (the kept tokens stay gathered), then :func:`end_tower`."""
    for layer in layers:
        hidden, state = layer(hidden, mask, comp_state=state, **kwargs)
    end_tower(layers)
    return hidden, state


def attention_pool(head: nn.Module, hidden: torch.Tensor, state: TokenState) -> torch.Tensor:
    """SiglipMultiheadAttentionPoolingHead over the kept tokens: the probe attends to the valid slots only."""
    if bool(state.valid.all()):
        return head(hidden)
    probe = head.probe.repeat(hidden.shape[0], 1, 1)
    pooled = head.attention(probe, hidden, hidden, key_padding_mask=~state.valid)[0]
    return (pooled + head.mlp(head.layernorm(pooled)))[:, 0]


def siglip_vision_forward(self: nn.Module, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False,
                          **kwargs) -> BaseModelOutputWithPooling:
    """Instance forward of SiglipVisionModel: every patch prunable; the head pools the kept ones."""
    hidden = self.embeddings(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
    b, n = hidden.shape[:2]
    layers = self.encoder.layers
    state = label_pools(layers, TokenState.start(b, n, hidden.device, pooled_token=False))
    hidden, state = run_layers(layers, hidden, None, state, **kwargs)
    hidden = self.post_layernorm(hidden)
    pooled = attention_pool(self.head, hidden, state) if self.use_head else None
    return BaseModelOutputWithPooling(last_hidden_state=tokens.scatter_to_full(hidden, state), pooler_output=pooled)


def siglip_text_forward(self: nn.Module, input_ids: torch.Tensor, attention_mask=None, position_ids=None,
                        **kwargs) -> BaseModelOutputWithPooling:
    """Instance forward of SiglipTextModel: bidirectional, pooled at the last position (always kept, a query even
    where a padding mask hides it as a key)."""
    input_ids = input_ids.view(-1, input_ids.shape[-1])
    hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids)
    mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask)
    b, n = input_ids.shape
    valid = None if attention_mask is None else attention_mask.view(b, n).bool()
    last = torch.full((b,), n - 1, dtype=torch.long, device=hidden.device)
    layers = self.encoder.layers
    state = label_pools(layers, TokenState.start(b, n, hidden.device, valid=valid, pooled=last))
    hidden, state = run_layers(layers, hidden, mask, state, **kwargs)
    hidden = tokens.scatter_to_full(self.final_layer_norm(hidden), state)
    return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=self.head(hidden[:, -1]))


def sigmoid_loss(model: nn.Module, image_emb: torch.Tensor, text_emb: torch.Tensor,
                 positives: torch.Tensor | None = None) -> torch.Tensor:
    """SigLIP's loss: ``-sum_ij log sigmoid(z_ij (t cos_ij + b)) / B``, t = exp(logit_scale), b = logit_bias,
    z = +1 on relevant pairs (``positives``; the diagonal when None), -1 elsewhere."""
    logits = similarity_logits(image_emb, text_emb, model.logit_scale.float().exp()) + model.logit_bias.float()
    n = logits.shape[0]
    relevant = torch.eye(n, dtype=torch.bool, device=logits.device) if positives is None else positives
    signs = 2 * relevant.float() - 1
    return -F.logsigmoid(signs * logits).sum() / n


register_contrastive_loss(SiglipModel, sigmoid_loss)

_TOWERS = (("vision", "vision_config", "P_v", "T_v"), ("text", "text_config", "P_l", "T_l"))
_FORWARDS = {"vision": siglip_vision_forward, "text": siglip_text_forward}


@register_adapter
class SiglipAdapter(ModelAdapter):
    family = "siglip"
    model_classes = (SiglipModel,)
    auto_classes = ("AutoModel", "AutoModelForZeroShotImageClassification")

    def _tower_model(self, name: str) -> nn.Module:
        return getattr(self.model, f"{name}_model")

    def tower_specs(self) -> list[TowerSpec]:
        """The vision tower (P_v, T_v) and the bidirectional text tower (P_l, T_l)."""
        cfg = self.model.config
        return [clip_tower_spec(name, getattr(cfg, sub), pmode, tmode, False, f"{name}_model.encoder.layers")
                for name, sub, pmode, tmode in _TOWERS]

    def default_reference(self) -> dict:
        """The config's image size and the text padded to ``max_length`` (the position table's length)."""
        cfg = self.model.config
        return {"image_size": cfg.vision_config.image_size, "text_length": cfg.text_config.max_position_embeddings}

    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        """Vision: the patches (none always kept), the patch embedding and the pooling head's probe side (query and
        output projections, MLP on one token); text: the tokens (the last, pooled, kept) and the head."""
        cfg = self.model.config
        if spec.name == "vision":
            vc = cfg.vision_config
            patches, patch_embed = clip_patch_embedding(vc, int(reference["image_size"]))
            head = 4 * vc.hidden_size * (vc.hidden_size + vc.intermediate_size) if self._uses_head() else 0
            return patches, 0, patch_embed + head
        length = int(reference["text_length"])
        return length, min(1, length), 2 * cfg.text_config.hidden_size * cfg.text_config.projection_size

    def output_token_flops(self, spec: TowerSpec, reference: dict) -> int:
        """The vision pooling head, per kept patch: its key and value projections and the probe's two attention
        matmuls (4 D^2 + 4 D)."""
        if spec.name != "vision" or not self._uses_head():
            return 0
        d = self.model.config.vision_config.hidden_size
        return 4 * d * d + 4 * d

    def _uses_head(self) -> bool:
        return bool(self.model.vision_model.use_head)

    def _install_forward(self) -> None:
        """Each tower model's forward, its layers' (CLIP's) and their attentions'."""
        for name, forward in _FORWARDS.items():
            tower = self._tower_model(name)
            tower.forward = MethodType(forward, tower)
            for layer in tower.encoder.layers:
                layer.forward = MethodType(clip_layer_forward, layer)
                layer.self_attn.forward = MethodType(siglip_attention_forward, layer.self_attn)

    def _uninstall_forward(self) -> None:
        """Undo :meth:`_install_forward`."""
        for name in _FORWARDS:
            tower = self._tower_model(name)
            tower.__dict__.pop("forward", None)
            for layer in tower.encoder.layers:
                layer.__dict__.pop("forward", None)
                layer.self_attn.__dict__.pop("forward", None)
