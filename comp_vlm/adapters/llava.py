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
the call passes ``labels`` (training); in a ``generate`` call, at the length of the call's first forward; else after
the last token. Pools: ``image`` (the image-token positions of the call's ``input_ids``) and ``instruction`` (every
other prunable token).

Generation (:meth:`LlavaForConditionalGeneration.generate`, wrapped on the instance): a pruned prefill leaves its
layers' KV caches at different lengths. The prefill records on the cache object, per layer, the original position,
validity and (``merge``) size of every prompt slot the layer's cache holds (:class:`CacheSlots`); the record follows
the cache's batch reorders (beam search) and is made anew by every prefill, so by every ``generate`` call. A decode
step builds each layer's mask from it (:func:`decode_masks`) instead of transformers' one mask sized from layer 0.
Within one ``generate`` call the prompt length is fixed at the call's first forward: later tokens are never prunable
and sites score by the last prompt token's row, so ``use_cache=False`` (each step re-runs the whole sequence) keeps
the same tokens as the cache. Per-layer cache lengths rule out a static cache, a compiled forward and attention
implementations that take no 4-D mask (flash attention): on a model with an active token site they raise
:class:`ConfigError` (:func:`check_pruned_generation`, :func:`check_uncompiled`; a ``torch.compile`` wrapper around
the model cannot be seen from inside: dynamo breaks the graph at the token sites and runs them eagerly).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import Any

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
from .common import COMP_ATTENTION, proportional_bias
from .runtime import LayerCall, TokenPool, end_tower
from .units import UnitSpec, attention_heads, kv_groups, mlp_neurons

IGNORE_INDEX = -100  # labels of the positions that carry no loss (transformers' convention)
DEFAULT_TEXT_LENGTH = 16  # prompt text tokens (image tokens aside) of the default FLOPs reference
LOGITS_KEPT = 1  # tokens lm_head runs on in the counted forward: the last one (generate's prefill, logits_to_keep=1)
PRUNED_CACHE_ATTR = "comp_vlm_slots"  # the CacheSlots of a KV cache whose prefill dropped tokens
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


# ---- generation: the pruned KV cache --------------------------------------------------------------------------------
MASKED_ATTENTIONS = ("eager", "sdpa", COMP_ATTENTION)  # attention implementations that take an arbitrary 4-D mask
GENERATE_ATTR = "_comp_generate"  # on the LLM during a generate call: {"prompt_length": n} once its first forward ran
BATCH_OPS: dict[str, Callable[[torch.Tensor, Any], torch.Tensor]] = {
    "reorder_cache": lambda t, beam_idx: t.index_select(0, beam_idx.to(t.device)),
    "batch_repeat_interleave": lambda t, repeats: t.repeat_interleave(repeats, dim=0),
    "batch_select_indices": lambda t, indices: t[indices],
}  # the Cache methods that change the batch, and how each changes a (B, ...) tensor


@dataclass
class CacheSlots:
    """What a pruned prefill leaves on its KV cache (attribute :data:`PRUNED_CACHE_ATTR`): the prompt length, and per
    LLM layer the original position, validity and size (``merge``; None: every slot holds one token) of each
    prompt slot the layer's cache holds, each (B, n_layer)."""

    prompt_length: int
    positions: list[torch.Tensor]
    valid: list[torch.Tensor]
    size: list[torch.Tensor | None]

    @staticmethod
    def of(states: list[TokenState], prompt_length: int) -> CacheSlots:
        """The record of a prefill whose layers got ``states`` (each layer caches the keys of its input slots)."""
        return CacheSlots(prompt_length, [s.positions for s in states], [s.valid for s in states],
                          [s.size for s in states])

    def batch_op(self, op: Callable[[torch.Tensor, Any], torch.Tensor], arg: Any) -> None:
        """Apply a batch change (:data:`BATCH_OPS`) to every tensor, as the cache applies it to its keys."""
        self.positions = [op(t, arg) for t in self.positions]
        self.valid = [op(t, arg) for t in self.valid]
        self.size = [None if t is None else op(t, arg) for t in self.size]


def _following(cache, name: str, op: Callable[[torch.Tensor, Any], torch.Tensor]) -> Callable[[Any], None]:
    """``cache.<name>`` followed by the same change of the cache's :class:`CacheSlots` (if it holds one now)."""
    method = getattr(type(cache), name)

    def follow(arg: Any) -> None:
        method(cache, arg)
        slots = getattr(cache, PRUNED_CACHE_ATTR, None)
        if slots is not None:
            slots.batch_op(op, arg)
    return follow


def record_cache_slots(cache, slots: CacheSlots | None) -> None:
    """Put a prefill's record on ``cache`` (None: the prefill dropped nothing); its batch changes follow the cache's."""
    setattr(cache, PRUNED_CACHE_ATTR, slots)
    if slots is not None and not getattr(cache, "_comp_follows", False):
        for name, op in BATCH_OPS.items():
            setattr(cache, name, _following(cache, name, op))
        cache._comp_follows = True


def decode_masks(slots: CacheSlots, past: int, queries: int, attention_mask: torch.Tensor | None,
                 dtype: torch.dtype, proportional: bool) -> list[torch.Tensor]:
    """Each layer's additive (B, 1, q, n_layer + past - L + q) mask for ``queries`` new tokens after ``past`` tokens
    (the original sequence: layer 0's cache, never pruned): a key is the layer's cached prompt slot (its validity
    and original position from ``slots``) or a token after the prompt (valid where the 2-D ``attention_mask`` says
    so); causal in original positions. ``proportional``: with the merge bias log(size) on the prompt slots."""
    total, prompt = past + queries, slots.prompt_length
    device = slots.valid[0].device
    b = slots.valid[0].shape[0]
    later = torch.arange(prompt, total, device=device).expand(b, -1)
    later_ok = torch.ones(later.shape, dtype=torch.bool, device=device)
    if attention_mask is not None and attention_mask.dim() == 2:
        later_ok = attention_mask[:, prompt:total].bool()
    query = torch.arange(total - queries, total, device=device)[None, :, None]
    out = []
    for positions, valid, size in zip(slots.positions, slots.valid, slots.size):
        columns = torch.cat([positions, later], dim=1)
        allowed = torch.cat([valid, later_ok], dim=1)[:, None, :] & (columns[:, None, :] <= query)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
        mask = mask[:, None]
        if proportional and size is not None:
            mask = proportional_bias(mask, torch.cat([size, torch.ones(later.shape, device=device)], dim=1))
        out.append(mask)
    return out


def token_sites_on(layers: nn.ModuleList) -> bool:
    """Whether a layer's token site keeps fewer than all tokens of a pool (the model prunes tokens)."""
    return any(min((pool.keep(layer) for pool in layer.comp_runtime.pools), default=1.0) < 1.0
               for layer in layers if "comp_runtime" in layer.__dict__)


def check_pruned_generation(config, cache) -> None:
    """Raise ConfigError where a token-pruned LLM cannot run: its layers' KV caches differ in length and each layer
    needs its own 4-D mask."""
    impl = getattr(config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTIONS:
        raise ConfigError(f"attn_implementation {impl!r} takes no per-layer 4-D mask, which token pruning in the "
                          f"LLM needs; load the pruned model with attn_implementation 'sdpa' or 'eager'")
    if cache is not None and cache.is_compileable:
        raise ConfigError("a static KV cache cannot hold a token-pruned model's layers, whose caches differ in "
                          "length; generate with the default dynamic cache (no cache_implementation='static')")


def check_uncompiled(model: nn.Module, generate_kwargs: dict) -> None:
    """Raise ConfigError when a generate call on a token-pruned model asks for a compiled forward (``compile_config``)
    or the model, its LLM or an LLM layer was compiled in place (``module.compile()``). Checked outside the forward:
    an error raised while torch.compile traces is caught by dynamo, which runs the frame eagerly instead."""
    llm = model.model.language_model
    config = generate_kwargs.get("generation_config") or model.generation_config
    requested = generate_kwargs.get("compile_config", getattr(config, "compile_config", None))
    compiled = any(getattr(m, "_compiled_call_impl", None) is not None for m in (model, llm, *llm.layers))
    if (requested is not None or compiled) and token_sites_on(llm.layers):
        raise ConfigError("a compiled forward cannot follow token pruning (kept-token counts depend on the data and "
                          "the layers' KV caches differ in length); generate without compile_config or "
                          "module.compile()")


def _generate(self: nn.Module, *args, **kwargs):
    """Instance ``generate``: the class's, refused when compiled (:func:`check_uncompiled`), with the call's prompt
    length fixed at its first forward (see the LLM forward); that state lives for this call only."""
    check_uncompiled(self, kwargs)
    llm = self.model.language_model
    llm.__dict__[GENERATE_ATTR] = {}
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        llm.__dict__.pop(GENERATE_ATTR, None)


def kv_cache_bytes(cache) -> list[int]:
    """Bytes of each layer's keys and values in a KV cache."""
    return [sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
            for layer in cache.layers]


# ---- the LLM forwards -----------------------------------------------------------------------------------------------
def _llm_forward(self: nn.Module, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache=None, inputs_embeds: torch.Tensor | None = None,
                 use_cache: bool | None = None, **kwargs) -> BaseModelOutputWithPast:
    """Instance forward of the LLM (``LlamaModel``): LlamaModel's forward, its layers exchanging a TokenState at
    prefill (recorded on the cache: :class:`CacheSlots`); the output scattered back to full length. A decode step
    on a pruned cache masks each layer by its record (:func:`decode_masks`)."""
    image = self.__dict__.pop("_comp_image", None)
    answer = self.__dict__.pop("_comp_answer", None)
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if inputs_embeds is None:
        inputs_embeds = self.embed_tokens(input_ids)
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and cache is None:
        cache = DynamicCache(config=self.config)
    layers = self.layers[: self.config.num_hidden_layers]
    if token_sites_on(layers):
        check_pruned_generation(self.config, cache)
    past = cache.get_seq_length() if cache is not None else 0
    b, n = inputs_embeds.shape[:2]
    if position_ids is None:
        position_ids = (torch.arange(n, device=inputs_embeds.device) + past)[None]
    slots = getattr(cache, PRUNED_CACHE_ATTR, None) if past > 0 else None
    if slots is not None:  # each layer's cache holds its own slots
        layer_masks = decode_masks(slots, past, n, attention_mask, inputs_embeds.dtype,
                                   layers[0].comp_runtime.reducer == "merge")
    else:
        causal_mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds,
                                         attention_mask=attention_mask, cache=cache, position_ids=position_ids)
        layer_masks = [causal_mask] * len(layers)
    position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
    state = None
    if past == 0:  # prefill: token sites; a decode step runs the layers as the class does
        valid = torch.ones(b, n, dtype=torch.bool, device=inputs_embeds.device)
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask[:, -n:].bool()
        image = image if image is not None and image.shape == (b, n) else None
        answer = answer if answer is not None and answer.shape == (b,) else None
        call = self.__dict__.get(GENERATE_ATTR)
        if answer is None and call is not None:  # one generate call: the prompt is its first forward's tokens
            answer = torch.full((b,), call.setdefault("prompt_length", n), device=inputs_embeds.device)
        state = start_state(valid, image, answer)
    states = []
    hidden = inputs_embeds
    for layer, mask in zip(layers, layer_masks):
        states.append(state)
        out = layer(hidden, mask, comp_state=state, position_embeddings=position_embeddings,
                    position_ids=position_ids, cache=cache, use_cache=use_cache, **kwargs)
        hidden, state = out if state is not None else (out, None)
    if state is not None:
        end_tower(self.layers)
        if cache is not None:
            record_cache_slots(cache, CacheSlots.of(states, n) if state.gathered else None)
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
        self.model.generate = MethodType(_generate, self.model)

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
        self.model.__dict__.pop("generate", None)
