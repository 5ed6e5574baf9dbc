"""Adapter for Hugging Face BLIP: ``BlipForImageTextRetrieval`` (vision: P_v / T_v; text encoder: P_l / T_l, its
cross-attention heads P_c) and ``BlipForQuestionAnswering`` (also an answer decoder: P_l and P_c, no token sites).

Instance-level forwards (no class patch):

- each tower's encoder carries a :class:`TokenState` through its layers and returns only the kept tokens (never
  scattered back): the tokens a tower keeps are the keys/values of the cross-attention it feeds, as
  :class:`Coupling` ``cross_kv`` counts them; the first token (vision CLS, text first token) stays at slot 0, where
  BLIP reads it;
- a vision layer runs attention -> site -> MLP, through an attention that works for any head count (BLIP's own
  reshapes ``qkv`` by the input width);
- a text layer runs self-attention -> site -> cross-attention -> FFN (its queries and FFN see the kept tokens);
- every text attention applies the mask it is handed to its cross-attention (transformers 5.25 drops it) and,
  with every head pruned, gives its output projection's bias; a layer without self-attention heads has no site;
- a text layer feeds its collector the cross-attention output's input, the statistic of its cross heads;
- ``BlipForQuestionAnswering``'s ``forward`` and ``generate`` hand the decoder's cross-attention the validity of
  the question encoder's surviving slots (transformers passes the full question mask, or all ones in ``generate``).

The FLOPs reference is one image and one text through the ITM path (cross-attention on, the ITM head counted);
for VQA the decoder runs teacher-forced on ``answer_length`` tokens, its LM head counted.
"""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn
from transformers import BlipForImageTextRetrieval, BlipForQuestionAnswering
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPastAndCrossAttentions
from transformers.models.blip.modeling_blip import BlipTextVisionModelOutput
from transformers.pytorch_utils import apply_chunking_to_forward

from .. import masks
from ..collect import CAPTURE_FLAG, pop_captured
from ..errors import ConfigError, RecipeError
from ..recipe import Recipe
from ..structure import Coupling
from ..tokens import TokenState
from .base import ModelAdapter, TowerSpec, register_adapter
from .runtime import LayerCall, end_tower, label_pools
from .units import UnitSpec, attention_heads, mask_buffer, mlp_neurons

VALID_IN = "_comp_valid"  # on a text encoder module: the call's (B, n) token validity (set by TextCallHook)
VALID_OUT = "_comp_out_valid"  # on a text encoder module: the validity of the slots it returned (popped by the caller)


# ---- units ------------------------------------------------------------------------------------------------------------
def vision_units(heads: int, head_dim: int, neurons: int) -> tuple[UnitSpec, ...]:
    """A vision layer's units: heads of the fused ``qkv`` (rows [q|k|v]) and ``projection``, MLP neurons."""
    return (
        attention_heads("self_attn", (("self_attn.qkv", 3),), "self_attn.projection", head_dim, heads,
                        count_attrs=("num_heads",)),
        mlp_neurons("mlp", ("mlp.fc1",), "mlp.fc2", neurons),
    )


def text_attention_heads(attention: str, head_dim: int, heads: int, kind: str, field: str,
                         mode: str | None) -> UnitSpec:
    """The heads of a BLIP text attention block (``attention`` or ``crossattention``)."""
    q_k_v = tuple((f"{attention}.self.{name}", 1) for name in ("query", "key", "value"))
    return attention_heads(f"{attention}.self", q_k_v, f"{attention}.output.dense", head_dim, heads,
                           count_attrs=("num_attention_heads",), kind=kind, field=field,
                           width_attrs=("all_head_size",), mode=mode)


def text_units(heads: int, head_dim: int, neurons: int, cross: bool) -> tuple[UnitSpec, ...]:
    """A text layer's units: self-attention heads, FFN neurons and (with cross-attention) cross heads, mode P_c."""
    found = (text_attention_heads("attention", head_dim, heads, "head", "heads", None),
             mlp_neurons("intermediate", ("intermediate.dense",), "output.dense", neurons))
    if cross:
        found += (text_attention_heads("crossattention", head_dim, heads, "cross_head", "cross_heads", "P_c"),)
    return found


# ---- vision forwards ----------------------------------------------------------------------------------------------------
def vision_attention_forward(self: nn.Module, hidden_states: torch.Tensor, comp_attention_mask=None, **kwargs):
    """BlipAttention's maths for any head count (its own reshapes by the input width); no heads: the bias."""
    b, n, _ = hidden_states.shape
    heads = self.qkv.out_features // (3 * self.head_dim)
    if heads == 0:
        return self.projection(hidden_states.new_zeros(b, n, 0)), None
    qkv = self.qkv(hidden_states).reshape(b, n, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4)
    scores = torch.matmul(qkv[0], qkv[1].transpose(-1, -2)) * self.scale
    if comp_attention_mask is not None:
        scores = scores + comp_attention_mask
    probs = nn.functional.softmax(scores, dim=-1)
    context = torch.matmul(self.dropout(probs), qkv[2]).permute(0, 2, 1, 3)
    return self.projection(context.reshape(b, n, heads * self.head_dim)), probs


def _vision_layer_body(self: nn.Module, hidden: torch.Tensor, attention_mask, comp_state: TokenState,
                       comp_call: LayerCall, **kwargs) -> tuple[torch.Tensor, TokenState]:
    attn = self.self_attn
    n_heads = attn.qkv.out_features // (3 * attn.head_dim)
    step = self.comp_runtime.start(self, comp_state, comp_call, n_heads, getattr(attn, mask_buffer("head"), None))
    attn_out, probs = attn(self.layer_norm1(hidden), comp_attention_mask=step.attention_mask(attention_mask))
    step.after_attention(probs)
    hidden = step.site(hidden + attn_out)
    hidden = hidden + self.mlp(self.layer_norm2(hidden))
    return hidden, step.after_mlp()


def vision_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, comp_state=None,
                         **kwargs):
    """Instance forward of BlipEncoderLayer: attention -> token site -> MLP."""
    if comp_state is None:
        return type(self).forward(self, hidden_states, **kwargs)
    return self.comp_runtime.run(self, _vision_layer_body, hidden_states, attention_mask, comp_state, **kwargs)


def vision_encoder_forward(self: nn.Module, inputs_embeds: torch.Tensor, **kwargs) -> BaseModelOutput:
    """Instance forward of BlipEncoder: the kept tokens only (every image keeps as many; CLS at slot 0)."""
    b, n = inputs_embeds.shape[:2]
    state = label_pools(self.layers, TokenState.start(b, n, inputs_embeds.device))
    hidden = inputs_embeds
    for layer in self.layers:
        hidden, state = layer(hidden, None, comp_state=state, **kwargs)
    end_tower(self.layers)
    return BaseModelOutput(last_hidden_state=hidden)


# ---- text forwards ------------------------------------------------------------------------------------------------------
def text_attention_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                           encoder_hidden_states=None, cache=None, **kwargs):
    """Instance forward of BlipTextAttention: a cross-attention applies ``attention_mask`` (the class drops it);
    with no heads left, the output projection's bias (a self-attention still grows its cache by a placeholder)."""
    attn = self.self
    cross = encoder_hidden_states is not None
    if attn.query.out_features == 0:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if cache is not None and not cross:
            own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            # one zero channel, never read: the cache's length (read from layer 0) must count these tokens
            kv = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            own.update(kv, kv, attn.layer_idx)
        return self.output(empty, hidden_states), None
    context, probs = attn(hidden_states, attention_mask=None if cross else attention_mask,
                          encoder_hidden_states=encoder_hidden_states,
                          encoder_attention_mask=attention_mask if cross else None, cache=cache)
    return self.output(context, hidden_states), probs


def _text_layer_body(self: nn.Module, hidden: torch.Tensor, attention_mask, comp_state: TokenState,
                     comp_call: LayerCall, encoder_hidden_states=None, encoder_attention_mask=None, cache=None,
                     **kwargs) -> tuple[torch.Tensor, TokenState]:
    attn = self.attention.self
    n_heads = attn.query.out_features // attn.attention_head_size
    step = self.comp_runtime.start(self, comp_state, comp_call, n_heads, getattr(attn, mask_buffer("head"), None))
    hidden, probs = self.attention(hidden, attention_mask=step.attention_mask(attention_mask), cache=cache)
    step.after_attention(probs)
    hidden = step.site(hidden)
    if encoder_hidden_states is not None:
        cross_out = self.crossattention.output.dense
        cross_out.__dict__[CAPTURE_FLAG] = step.collect
        hidden, _ = self.crossattention(hidden, attention_mask=encoder_attention_mask,
                                        encoder_hidden_states=encoder_hidden_states, cache=cache)
        if step.collect:  # the cross heads' statistic, weighted by the scores of the tokens that query
            step.collector.on_attention(step.runtime.tower, step.runtime.index, step.scores, step.state,
                                        pop_captured(cross_out), kind="cross_head")
    hidden = apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim,
                                       hidden)
    return hidden, step.after_mlp()


def text_layer_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None, comp_state=None,
                       **kwargs):
    """Instance forward of BlipTextLayer: self-attention -> token site -> cross-attention -> FFN."""
    if comp_state is None:
        return type(self).forward(self, hidden_states, attention_mask=attention_mask, **kwargs)
    return self.comp_runtime.run(self, _text_layer_body, hidden_states, attention_mask, comp_state, **kwargs)


def text_encoder_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask=None,
                         encoder_hidden_states=None, encoder_attention_mask=None, cache=None, use_cache=None,
                         **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
    """Instance forward of BlipTextEncoder: the kept slots only (first token at slot 0); their validity is left in
    :data:`VALID_OUT` for the caller that hands them to a decoder."""
    valid = self.__dict__.pop(VALID_IN, None)
    b, n = hidden_states.shape[:2]
    if valid is not None and valid.shape != (b, n):
        valid = None
    if use_cache and not (self.gradient_checkpointing and self.training):
        if isinstance(cache, DynamicCache):
            cache = EncoderDecoderCache(cache, DynamicCache(config=self.config))
        elif cache is None:
            cache = EncoderDecoderCache(DynamicCache(config=self.config), DynamicCache(config=self.config))
    # bidirectional over the memory: every query row of the cross mask is the same, and sites shorten the queries
    cross_mask = None if encoder_attention_mask is None else encoder_attention_mask[:, :, :1]
    state = label_pools(self.layer, TokenState.start(b, n, hidden_states.device, valid=valid))
    for layer in self.layer:
        hidden_states, state = layer(hidden_states, attention_mask, comp_state=state,
                                     encoder_hidden_states=encoder_hidden_states,
                                     encoder_attention_mask=cross_mask, cache=cache, **kwargs)
    end_tower(self.layer)
    self.__dict__[VALID_OUT] = state.valid
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states, cache=cache)


class TextCallHook:
    """Forward pre-hook (with kwargs) on a BlipTextModel: hands the call's padding mask to its encoder forward."""

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if mask is None:
            module.encoder.__dict__.pop(VALID_IN, None)
        else:
            module.encoder.__dict__[VALID_IN] = mask.bool()


# ---- VQA: the adapter owns the question mask --------------------------------------------------------------------------
def encode_question(model: nn.Module, input_ids, pixel_values, attention_mask, interpolate_pos_encoding: bool,
                    **kwargs):
    """(vision outputs, question states, (B, n') long validity of the question states' slots)."""
    vision = model.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=interpolate_pos_encoding,
                                **kwargs)
    image_embeds = vision.last_hidden_state
    image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
    question = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask, **kwargs)
    return vision, question.last_hidden_state, model.text_encoder.encoder.__dict__.pop(VALID_OUT).long()


def vqa_forward(self: nn.Module, input_ids, pixel_values, decoder_input_ids=None, decoder_attention_mask=None,
                attention_mask=None, labels=None, interpolate_pos_encoding: bool = False, **kwargs):
    """BlipForQuestionAnswering.forward, the decoder's cross-attention masked by the surviving question slots."""
    if labels is None and decoder_input_ids is None:
        raise ValueError("BlipForQuestionAnswering needs decoder_input_ids or labels")
    vision, question, valid = encode_question(self, input_ids, pixel_values, attention_mask,
                                              interpolate_pos_encoding, **kwargs)
    answer = self.text_decoder(input_ids=labels if decoder_input_ids is None else decoder_input_ids,
                               attention_mask=decoder_attention_mask, encoder_hidden_states=question,
                               encoder_attention_mask=valid, labels=labels, reduction="mean", **kwargs)
    return BlipTextVisionModelOutput(loss=None if labels is None else answer.loss.mean(),
                                     image_embeds=vision.last_hidden_state,
                                     last_hidden_state=vision.last_hidden_state,
                                     hidden_states=vision.hidden_states, attentions=vision.attentions)


@torch.no_grad()
def vqa_generate(self: nn.Module, input_ids, pixel_values, attention_mask=None, interpolate_pos_encoding: bool = False,
                 **generate_kwargs) -> torch.LongTensor:
    """BlipForQuestionAnswering.generate, the decoder's cross-attention masked by the surviving question slots."""
    if isinstance(input_ids, list):
        input_ids = torch.LongTensor(input_ids)
    _, question, valid = encode_question(self, input_ids, pixel_values, attention_mask, interpolate_pos_encoding)
    bos = torch.full((question.shape[0], 1), self.decoder_start_token_id, device=question.device)
    text = self.config.text_config
    return self.text_decoder.generate(input_ids=bos, eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id,
                                      encoder_hidden_states=question, encoder_attention_mask=valid,
                                      **generate_kwargs)


# ---- the adapters ---------------------------------------------------------------------------------------------------------
class BlipAdapter(ModelAdapter):
    """What both BLIP classes share: the vision tower, the text encoder, the forwards."""

    family = "blip"
    attn_implementation = "eager"  # BLIP has no sdpa
    token_reducers = ("drop",)  # its forwards do not carry fused or merged tokens yet (issue 24's reducers)

    def _text_spec(self, name: str, layers_path: str, token_mode: str | None, causal: bool) -> TowerSpec:
        tc = self.model.config.text_config
        head_dim = tc.hidden_size // tc.num_attention_heads
        return TowerSpec(name=name, param_mode="P_l", token_mode=token_mode, layers_path=layers_path,
                         num_heads=tc.num_attention_heads, head_dim=head_dim, hidden=tc.hidden_size,
                         neurons=tc.intermediate_size, causal=causal,
                         units=text_units(tc.num_attention_heads, head_dim, tc.intermediate_size, tc.is_decoder))

    def tower_specs(self) -> list[TowerSpec]:
        vc = self.model.config.vision_config
        head_dim = vc.hidden_size // vc.num_attention_heads
        vision = TowerSpec(name="vision", param_mode="P_v", token_mode="T_v", layers_path="vision_model.encoder.layers",
                           num_heads=vc.num_attention_heads, head_dim=head_dim, hidden=vc.hidden_size,
                           neurons=vc.intermediate_size, causal=False,
                           units=vision_units(vc.num_attention_heads, head_dim, vc.intermediate_size))
        return [vision, self._text_spec("text", "text_encoder.encoder.layer", "T_l", False)]

    def couplings(self) -> tuple[Coupling, ...]:
        return (Coupling("cross_kv", "vision", "text"),) if self.model.config.text_config.is_decoder else ()

    def layer_fields(self, spec: TowerSpec, layer: int) -> dict:
        tc = self.model.config.text_config
        return {"cross_kv_hidden": tc.encoder_hidden_size} if spec.name != "vision" and tc.is_decoder else {}

    def default_reference(self) -> dict:
        vc, tc = self.model.config.vision_config, self.model.config.text_config
        return {"image_size": vc.image_size, "image_width": vc.image_size,
                "text_length": min(16, tc.max_position_embeddings)}

    def head_flops(self) -> int:
        """FLOPs of the task head on the text encoder's output, per sample (none by default)."""
        return 0

    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        if spec.name == "vision":
            conv = self.model.vision_model.embeddings.patch_embedding
            p = conv.kernel_size[0]
            patches = (int(reference["image_size"]) // p) * (int(reference["image_width"]) // p)
            return patches + 1, 1, 2 * patches * conv.in_channels * p * p * conv.out_channels
        return int(reference["text_length"]), 1, self.head_flops()

    def _towers(self) -> dict[str, nn.Module]:
        """Each tower's encoder module (the one holding its layers)."""
        return {"vision": self.model.vision_model.encoder, "text": self.model.text_encoder.encoder}

    def _text_models(self) -> list[nn.Module]:
        return [self.model.text_encoder]

    def _install_forward(self) -> None:
        """Each tower's encoder, layer and attention forwards, and the text models' :class:`TextCallHook`."""
        encoders = self._towers()
        for spec in self.tower_specs():
            encoder = encoders[spec.name]
            vision = spec.name == "vision"
            encoder.forward = MethodType(vision_encoder_forward if vision else text_encoder_forward, encoder)
            for layer in self.layers(spec):
                layer.forward = MethodType(vision_layer_forward if vision else text_layer_forward, layer)
                for attn in self._attentions(layer, vision):
                    attn.forward = MethodType(vision_attention_forward if vision else text_attention_forward, attn)
        for text in self._text_models():
            if not masks.has_hook(text, (TextCallHook,)):
                text.register_forward_pre_hook(TextCallHook(), with_kwargs=True)

    @staticmethod
    def _attentions(layer: nn.Module, vision: bool) -> list[nn.Module]:
        if vision:
            return [layer.self_attn]
        return [layer.attention] + ([layer.crossattention] if hasattr(layer, "crossattention") else [])

    def _uninstall_forward(self) -> None:
        """Undo :meth:`_install_forward`."""
        encoders = self._towers()
        for spec in self.tower_specs():
            encoder = encoders[spec.name]
            for attr in ("forward", VALID_IN, VALID_OUT):
                encoder.__dict__.pop(attr, None)
            for layer in self.layers(spec):
                layer.__dict__.pop("forward", None)
                for attn in self._attentions(layer, spec.name == "vision"):
                    attn.__dict__.pop("forward", None)
        for text in self._text_models():
            masks.remove_hooks(text, (TextCallHook,))

    def validate_recipe(self, recipe: Recipe) -> None:
        if recipe.family == self.family and recipe.model_class != type(self.model).__name__:
            raise RecipeError(f"recipe is for {recipe.model_class} (config hash {recipe.base_config_hash}), the model "
                              f"is {type(self.model).__name__} (config hash {self.base_config_hash()})")
        super().validate_recipe(recipe)


@register_adapter
class BlipRetrievalAdapter(BlipAdapter):
    """``BlipForImageTextRetrieval``: the ITM head counts in the FLOPs reference."""

    model_classes = (BlipForImageTextRetrieval,)

    def head_flops(self) -> int:
        itm = self.model.itm_head
        return 2 * itm.in_features * itm.out_features


@register_adapter
class BlipVQAAdapter(BlipAdapter):
    """``BlipForQuestionAnswering``: a third tower, the answer decoder (P_l, P_c; answer tokens are never pruned),
    whose cross-attention reads the question encoder's kept tokens."""

    model_classes = (BlipForQuestionAnswering,)
    auto_classes = ("AutoModel", "AutoModelForVisualQuestionAnswering")

    def __init__(self, model: nn.Module) -> None:
        vc, tc = model.config.vision_config, model.config.text_config
        if vc.hidden_size != tc.hidden_size:
            raise ConfigError(f"BlipForQuestionAnswering needs the vision width (hidden_size {vc.hidden_size}) to "
                              f"equal the text width (hidden_size {tc.hidden_size}): one text config serves the "
                              "question encoder and the answer decoder")
        super().__init__(model)

    def tower_specs(self) -> list[TowerSpec]:
        return [*super().tower_specs(), self._text_spec("decoder", "text_decoder.bert.encoder.layer", None, True)]

    def couplings(self) -> tuple[Coupling, ...]:
        return (*super().couplings(), Coupling("cross_kv", "text", "decoder"))

    def default_reference(self) -> dict:
        return {**super().default_reference(), "answer_length": min(8, self.model.config.text_config.max_position_embeddings)}

    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        if spec.name != "decoder":
            return super().tower_io(spec, reference)
        answer = int(reference["answer_length"])
        head = self.model.text_decoder.cls.predictions
        lm = sum(lin.in_features * lin.out_features for lin in (head.transform.dense, head.decoder))
        return answer, answer, 2 * answer * lm

    def _towers(self) -> dict[str, nn.Module]:
        return {**super()._towers(), "decoder": self.model.text_decoder.bert.encoder}

    def _install_forward(self) -> None:
        """BLIP's forwards, and the model's ``forward`` and ``generate`` (the decoder reads the kept question)."""
        super()._install_forward()
        self.model.forward = MethodType(vqa_forward, self.model)
        self.model.generate = MethodType(vqa_generate, self.model)

    def _uninstall_forward(self) -> None:
        """Undo :meth:`_install_forward`."""
        super()._uninstall_forward()
        for attr in ("forward", "generate"):
            self.model.__dict__.pop(attr, None)
