"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (vision tower: P_v; LLM: P_l, image tokens T_v and
instruction tokens T_l).

The vision tower is a CLIP encoder and runs CLIP's instance forwards (:mod:`comp_vlm.adapters.clip`) without token
sites: LLaVA prunes image tokens inside the LLM, where the projector puts one image feature at every
``config.image_token_id`` of the prompt. The LLM (``LlamaModel``) gets an instance forward that carries a
:class:`TokenState` through its decoder layers: it builds each later layer's mask (causal in original order,
padding and dropped slots hidden), gathers the RoPE cos/sin with the kept tokens (a kept token keeps its original
position id) and scatters the final hidden states back to full length, so ``logits[:, -1]`` reads the last prompt
token of every row, left padding included.

Never pruned: each row's first real token (BOS), its last prompt token (the scoring row: sites score tokens by its
attention row, max over heads) and every answer token. The answer starts at a row's first labelled position when
the call passes ``labels`` (training), else after the last token. Pools: ``image`` (the image-token positions of
the call's ``input_ids``) and ``instruction`` (every other prunable token).

Generation with a pruned KV cache is not implemented yet: a decode step on a cache whose prefill dropped tokens
raises :class:`ConfigError` (``use_cache=False`` works; with every keep ratio at 1 the cache works as usual).
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn
from transformers import LlavaForConditionalGeneration
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils.output_capturing import capture_outputs

from .. import masks, tokens
from ..errors import ConfigError
from ..structure import Coupling
from ..tokens import TokenState
from . import units
from .base import ModelAdapter, TowerSpec, register_adapter
from .clip import clip_patch_embedding, clip_tower_spec, install_clip_tower, uninstall_clip_tower
from .runtime import LayerCall, TokenPool, end_tower
from .units import UnitSpec, attention_heads, kv_groups, mlp_neurons

IGNORE_INDEX = -100  # labels of the positions that carry no loss (transformers' convention)
DEFAULT_TEXT_LENGTH = 16  # prompt text tokens (image tokens aside) of the default FLOPs reference
LOGITS_KEPT = 1  # tokens lm_head runs on in the counted forward: the last one (generate's prefill, logits_to_keep=1)
PRUNED_CACHE_ATTR = "comp_vlm_pruned"  # set on a KV cache whose prefill dropped tokens
LLM_POOLS = (TokenPool("image", "T_v"), TokenPool("instruction", "T_l"))
IMAGE_POOL, INSTRUCTION_POOL = 0, 1


def llama_units(heads: int, kv_heads: int, head_dim: int, neurons: int) -> tuple[UnitSpec, ...]:
    """A Llama decoder layer's prunable units: attention heads (KV groups with their query heads under GQA) and
    gate/up/down neurons."""
    if kv_heads < heads:
        attention = kv_groups("self_attn", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                              "self_attn.o_proj", head_dim, kv_heads, heads // kv_heads)
    else:
        q_k_v = (("self_attn.q_proj", 1), ("self_attn.k_proj", 1), ("self_attn.v_proj", 1))
        attention = attention_heads("self_attn", q_k_v, "self_attn.o_proj", head_dim, heads)
    return attention, mlp_neurons("mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", neurons)


def llm_pool_labels(state: TokenState) -> torch.Tensor:
    """The LLM's :data:`~comp_vlm.adapters.runtime.PoolLabels`: the pools its forward labelled the input state with
    (image-token positions come from the call's input ids, which a state alone does not hold: :func:`start_state`)."""
    return state.pool


# ---- the call: image-token positions and the prompt/answer boundary ----------------------------------------------
class ImageTokenHook:
    """Forward pre-hook (with kwargs) on ``LlavaModel``: hands the call's image-token positions (B, n) to the LLM
    forward through a transient attribute the LLM pops. Read from ``input_ids == config.image_token_id``, or, for
    a call with ``inputs_embeds``, where the embedding equals the image token's (as transformers does)."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        image_id = module.config.image_token_id
        if input_ids is not None:
            image = input_ids == image_id
        elif kwargs.get("inputs_embeds") is not None:
            embeds = kwargs["inputs_embeds"]
            token = module.get_input_embeddings()(torch.full((), image_id, dtype=torch.long, device=embeds.device))
            image = (embeds == token).all(-1)
        else:
            return
        module.language_model.__dict__["_comp_image"] = image


class AnswerStartHook:
    """Forward pre-hook (with kwargs) on ``LlavaForConditionalGeneration``: hands each row's answer start (its first
    labelled position; none: the row's length) to the LLM forward, or None when the call has no labels."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        labels = kwargs.get("labels")
        start = None if labels is None else answer_start(labels)
        module.model.language_model.__dict__["_comp_answer"] = start


def answer_start(labels: torch.Tensor) -> torch.Tensor:
    """(B,) the first position of each row whose label is not :data:`IGNORE_INDEX` (the row's length if none)."""
    n = labels.shape[1]
    slot = torch.arange(n, device=labels.device).expand_as(labels)
    return torch.where(labels != IGNORE_INDEX, slot, n).min(dim=1).values


def start_state(valid: torch.Tensor, image: torch.Tensor | None, answer: torch.Tensor | None) -> TokenState:
    """The LLM's input state: ``valid`` (B, n) real tokens; ``image`` (B, n) image-token positions (None: none);
    ``answer`` (B,) each row's answer start (None: no answer). The first real token, the last real prompt token
    (the pooled, scoring row) and every answer token are never pruned; prunable slots are labelled with their
    pool (:data:`IMAGE_POOL` / :data:`INSTRUCTION_POOL`)."""
    b, n = valid.shape
    slot = torch.arange(n, device=valid.device).expand(b, n)
    end = torch.full((b,), n, device=valid.device) if answer is None else answer.to(valid.device)
    first = torch.where(valid, slot, n).min(dim=1).values
    last_prompt = torch.where(valid & (slot < end[:, None]), slot, -1).max(dim=1).values.clamp(min=0)
    always = (slot == first[:, None]) | (slot >= end[:, None])
    state = TokenState.start(b, n, valid.device, valid=valid, pooled=last_prompt, always_kept=always)
    labels = torch.full((b, n), INSTRUCTION_POOL, device=valid.device)
    if image is not None:
        labels = torch.where(image.to(valid.device), IMAGE_POOL, labels)
    return state.labelled(labels, len(LLM_POOLS))


def gather_rope(position_embeddings: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The RoPE (cos, sin), each (B or 1, N, d), of the slots at original ``positions`` (B, n): a kept token keeps
    its original position."""
    index = positions[:, :, None]
    return tuple(t.expand(positions.shape[0], -1, -1).gather(1, index.expand(-1, -1, t.shape[-1])) for t in position_embeddings)


# ---- the LLM forwards -----------------------------------------------------------------------------------------------
def _llm_forward(self: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                 use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
    """Instance forward of the LLM (``LlamaModel``): LlamaModel's forward, its layers exchanging a TokenState at
    prefill; the output scattered back to full length."""
    image = self.__dict__.pop("_comp_image", None)
    answer = self.__dict__.pop("_comp_answer", None)
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    past = cache.get_seq_length() if cache is not None else 0
    if past > 0 and getattr(cache, PRUNED_CACHE_ATTR, False):
        raise ConfigError("decoding with a KV cache whose prefill dropped tokens is not supported yet; generate "
                          "with use_cache=False, or set every token keep ratio to 1")
    b, n = inputs_embeds.shape[:2]
    if position_ids is None:
        position_ids = (torch.arange(n, device=inputs_embeds.device) + past)[None]
    causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     cache=cache, position_ids=position_ids)
    position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
    state = None
    if past == 0:  # prefill: token sites; a decode step runs the layers as the class does
        valid = torch.ones(b, n, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -n:].bool()
        image = image if image is not None and image.shape == (b, n) else None
        answer = answer if answer is not None and answer.shape == (b,) else None
        state = start_state(valid, image, answer)
    hidden = inputs_embeds
    for layer in self.layers[: self.config.num_hidden_layers]:
        out = layer(hidden, causal_mask, comp_state=state, position_embeddings=position_embeddings,
                    position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        hidden, state = out if state is not None else (out, None)
    if state is not None:
        end_tower(self.layers)
        if state.gathered and cache is not None:
            setattr(cache, PRUNED_CACHE_ATTR, True)
    hidden = self.norm(hidden)
    if state is not None:
        hidden = tokens.scatter_to_full(hidden, state)
    return BaseModelOutputWithPast(last_hidden_state=hidden, cache=cache)


llm_forward = capture_outputs(_llm_forward)  # output_hidden_states / output_attentions as LlamaModel records them


def _head_mask(attn: nn.Module) -> torch.Tensor | None:
    """The soft mask of the attention's query heads (H,): a KV group's value repeated for each of its query heads."""
    group = getattr(attn, units.mask_buffer("kv_group"), None)
    if group is not None:
        return group.repeat_interleave(attn.num_key_value_groups)
    return getattr(attn, units.mask_buffer("head"), None)


def _llm_layer_body(self: nn.Module, hidden: torch.Tensor, attention_mask, comp_state: TokenState,
                    comp_call: LayerCall, position_embeddings=None, **kwargs) -> tuple[torch.Tensor, TokenState]:
    """LlamaDecoderLayer's maths; its SiteRuntime runs the protocol after attention, at the site, after the MLP."""
    attn = self.self_attn
    n_heads = attn.q_proj.out_features // attn.head_dim
    step = self.comp_runtime.start(self, comp_state, comp_call, n_heads, _head_mask(attn))
    if comp_state.gathered:
        position_embeddings = gather_rope(position_embeddings, comp_state.positions)
    x = self.input_layernorm(hidden)
    if n_heads == 0:
        attn_out, probs = attn.o_proj(x.new_zeros(*x.shape[:-1], 0)), None
    else:  # is_causal: an attention asked for probabilities applies causality where the model passed no mask
        attn_out, probs = attn(hidden_states=x, position_embeddings=position_embeddings,
                               attention_mask=step.attention_mask(attention_mask), comp_need_probs=step.need_probs,
                               is_causal=True, **kwargs)
    step.after_attention(probs)
    hidden = step.site(hidden + attn_out)
    hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
    return hidden, step.after_mlp()


def llm_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, comp_state=None, **kwargs):
    """Instance forward of LlamaDecoderLayer: attention -> token site -> MLP; keeps gradient checkpointing (without
    a cache, as transformers does)."""
    if comp_state is None:  # a decode step, or a call outside the comp-vlm LLM forward: behave like the class
        return type(self).forward(self, hidden_states, attention_mask, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        kwargs.update(cache=None, use_cache=False)
    return self.comp_runtime.run(self, _llm_layer_body, hidden_states, attention_mask, comp_state, **kwargs)


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)
    token_reducers = ("drop",)  # its LLM forward does not carry fused or merged tokens yet (issue 24's reducers)
    auto_classes = ("AutoModelForImageTextToText",)

    def tower_specs(self) -> list[TowerSpec]:
        cfg = self.model.config
        tc = cfg.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        kv_heads = tc.num_key_value_heads or tc.num_attention_heads
        llm = TowerSpec(name="llm", param_mode="P_l", token_mode=None, layers_path="model.language_model.layers",
                        num_heads=tc.num_attention_heads, head_dim=head_dim, hidden=tc.hidden_size,
                        neurons=tc.intermediate_size, causal=True,
                        units=llama_units(tc.num_attention_heads, kv_heads, head_dim, tc.intermediate_size),
                        mlp_matrices=3, pools=LLM_POOLS, pool_labels=llm_pool_labels)
        vision = clip_tower_spec("vision", cfg.vision_config, "P_v", None, False, "model.vision_tower.encoder.layers")
        return [vision, llm]

    def default_reference(self) -> dict:
        return {"image_size": self.model.config.vision_config.image_size, "text_length": DEFAULT_TEXT_LENGTH}

    def _skip(self) -> int:
        """Vision tokens the projector never sees: CLS under the ``default`` feature selection."""
        return 1 if self.model.config.vision_feature_select_strategy == "default" else 0

    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        cfg = self.model.config
        tc = cfg.text_config
        if spec.name == "vision":
            vc = cfg.vision_config
            patches, patch_embed = clip_patch_embedding(vc, int(reference["image_size"]))
            layers = cfg.vision_feature_layer
            width = vc.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)
            image_tokens = patches + 1 - self._skip()
            projector = 2 * image_tokens * (width * tc.hidden_size + tc.hidden_size * tc.hidden_size)
            return patches + 1, 1, patch_embed + projector
        length = int(reference["text_length"])
        return length, min(2, length), 2 * LOGITS_KEPT * tc.hidden_size * tc.vocab_size

    def pool_tokens(self, spec: TowerSpec, reference: dict, prunable: int) -> dict[str, int]:
        """The LLM's own prunable tokens are instruction tokens; its image tokens come through the coupling."""
        if spec.name != "llm":
            return super().pool_tokens(spec, reference, prunable)
        return {"image": 0, "instruction": prunable}

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling("token_span", "vision", "llm", skip=self._skip(), pool="image"),)

    def _llm(self) -> nn.Module:
        return self.model.model.language_model

    def _install_forward(self) -> None:
        """The vision tower's CLIP forwards (no token sites), the LLM's forwards, and the call hooks."""
        install_clip_tower(self.model.model.vision_tower.encoder)
        llm = self._llm()
        llm.forward = MethodType(llm_forward, llm)
        for layer in llm.layers:
            layer.forward = MethodType(llm_layer_forward, layer)
        for module, hook in ((self.model.model, ImageTokenHook), (self.model, AnswerStartHook)):
            if not masks.has_hook(module, (hook,)):
                module.register_forward_pre_hook(hook(), with_kwargs=True)

    def _uninstall_forward(self) -> None:
        """Undo :meth:`_install_forward`."""
        uninstall_clip_tower(self.model.model.vision_tower.encoder)
        llm = self._llm()
        for key in ("forward", "_comp_image", "_comp_answer"):
            llm.__dict__.pop(key, None)
        for layer in llm.layers:
            layer.__dict__.pop("forward", None)
        masks.remove_hooks(self.model.model, (ImageTokenHook,))
        masks.remove_hooks(self.model, (AnswerStartHook,))
