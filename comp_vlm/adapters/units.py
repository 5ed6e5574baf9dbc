"""Prunable units as data (adapter protocol v2, issue 12).

A family declares, per tower, the *kinds* of unit a layer has (:class:`UnitSpec`: attention heads, MLP neurons;
cross-attention heads and GQA KV groups are further specs, not further code) and what each unit spans: channel
blocks of linears (:class:`Span`), as output rows or input columns. A :class:`UnitGroup` is one kind in one layer
of one tower. Everything per unit -- soft masks, the original-index bookkeeping, statistics, scores, slicing,
recipe entries, FLOPs -- goes through one generic path driven by these descriptions
(Torch-Pruning's dependency groups, without the tracing: the adapter states the coupling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import masks
from ..surgery import block_channels, replace_submodule, slice_linear_in, slice_linear_out

UnitKey = tuple[str, str, int]  # (kind, tower, layer)

AXES = ("out", "in")


@dataclass(frozen=True)
class Span:
    """The channels of one linear that the units own: ``axis`` 'out' (weight rows and bias entries) or 'in'
    (weight columns), laid out unit after unit in blocks of ``width`` channels (None: the group's width; a GQA
    key/value group spans q_per_kv x head_dim rows of q_proj but head_dim rows of k_proj); a fused projection
    repeats the layout ``repeats`` times (a [q|k|v] linear: 3). ``masked``: the unit's soft mask scales these
    channels (the output of an 'out' span, the input of an 'in' span)."""

    path: str  # the linear, relative to the layer module
    axis: str
    repeats: int = 1
    masked: bool = False
    width: int | None = None

    def __post_init__(self) -> None:
        if self.axis not in AXES or self.repeats < 1 or (self.width is not None and self.width < 1):
            raise ValueError(f"span {self.path!r}: axis must be one of {AXES}, repeats >= 1 and width >= 1")


@dataclass(frozen=True)
class UnitSpec:
    """One kind of prunable unit in the layers of a tower.

    ``owner``: the module (relative to the layer) holding the kind's mask buffer and original indices.
    ``width``: channels per unit in every span without a width of its own. ``dense``: units per layer in the
    unpruned model.
    ``stat_path``: the linear whose input carries the importance statistic and whose weight columns score a unit.
    ``structure_field``: the :class:`comp_vlm.structure.LayerStructure` field counting these units;
    ``field_multiples``: further (field, factor) pairs the kind sets to count x factor (a GQA key/value group:
    ``structure_field`` "kv_heads", ``(("heads", q_per_kv),)``).
    ``count_attrs``: attributes on the owner holding the unit count; ``width_attrs``: attributes holding count x
    ``width`` (BLIP's ``all_head_size``); both rewritten when slicing.
    ``mode``: the kind's parameter mode (None: its tower's ``param_mode``; BLIP's cross-attention heads: P_c).
    ``share_floor``: a layer keeps at least ``PruneConfig.neuron_floor`` of its dense units (MLP neurons), else
    ``head_floor`` units (attention kinds).
    """

    kind: str
    owner: str
    width: int
    dense: int
    spans: tuple[Span, ...]
    stat_path: str
    structure_field: str
    count_attrs: tuple[str, ...] = ()
    width_attrs: tuple[str, ...] = ()
    field_multiples: tuple[tuple[str, int], ...] = ()
    mode: str | None = None
    share_floor: bool = False

    @property
    def plural(self) -> str:
        """The kind's name in stage logs and recipes ('heads', 'neurons')."""
        return self.kind + "s"

    @property
    def mask_buffer(self) -> str:
        return mask_buffer(self.kind)

    @property
    def index_attr(self) -> str:
        """Owner attribute listing the original (dense) indices of the units a sliced layer still has."""
        return f"comp_{self.kind}_index"

    def span_width(self, span: Span) -> int:
        """Channels per unit in ``span``."""
        return channels_per_unit(span, self.width)

    @property
    def stat_width(self) -> int:
        """Channels per unit in the input columns of ``stat_path`` (its 'in' span, if the kind declares one)."""
        for span in self.spans:
            if span.path == self.stat_path and span.axis == "in":
                return self.span_width(span)
        return self.width

    def structure_counts(self, count: int) -> dict[str, int]:
        """The :class:`comp_vlm.structure.LayerStructure` fields ``count`` units of the kind set."""
        return {self.structure_field: count, **{name: count * factor for name, factor in self.field_multiples}}


@dataclass(frozen=True)
class UnitGroup:
    """The units of one kind in one layer of one tower, ``size`` of them now."""

    spec: UnitSpec
    tower: str
    mode: str
    layer: int
    size: int

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def key(self) -> UnitKey:
        return (self.spec.kind, self.tower, self.layer)


def channels_per_unit(span: Span, width: int) -> int:
    """Channels per unit in ``span`` of a kind ``width`` channels wide (the span's own width, if it has one)."""
    return width if span.width is None else span.width


def mask_buffer(kind: str) -> str:
    """Name of the (non-persistent) buffer holding a kind's soft mask on its owner module."""
    return f"comp_{kind}_mask"


def attention_heads(owner: str, q_k_v: tuple[tuple[str, int], ...], out: str, head_dim: int, count: int,
                    count_attrs: tuple[str, ...] = (), kind: str = "head", field: str = "heads",
                    width_attrs: tuple[str, ...] = (), mode: str | None = None) -> UnitSpec:
    """Heads: rows of the q/k/v projections ((linear, repeats) pairs; masked there, so a masked head flattens its
    softmax) and columns of the output projection (scored and measured there)."""
    spans = tuple(Span(path, "out", repeats, masked=True) for path, repeats in q_k_v) + (Span(out, "in"),)
    return UnitSpec(kind, owner, head_dim, count, spans, out, field, count_attrs, width_attrs, mode=mode)


def kv_groups(owner: str, q: str, k: str, v: str, out: str, head_dim: int, groups: int, q_per_kv: int,
              count_attrs: tuple[str, ...] = (), width_attrs: tuple[str, ...] = (),
              mode: str | None = None) -> UnitSpec:
    """GQA key/value groups: one key/value head (``head_dim`` rows of k and v) with its ``q_per_kv`` query heads
    (q_per_kv x head_dim rows of q, columns of the output projection). The masks act on q/k/v rows, like
    :func:`attention_heads`; ``width_attrs`` count head_dim channels per group (the key/value width)."""
    wide = q_per_kv * head_dim
    spans = (Span(q, "out", masked=True, width=wide), Span(k, "out", masked=True), Span(v, "out", masked=True),
             Span(out, "in", width=wide))
    return UnitSpec("kv_group", owner, head_dim, groups, spans, out, "kv_heads", count_attrs, width_attrs,
                    field_multiples=(("heads", q_per_kv),), mode=mode)


def mlp_neurons(owner: str, inputs: tuple[str, ...], out: str, count: int) -> UnitSpec:
    """Neurons: rows of fc1 (gate and up) and columns of fc2 (down), masked after the activation."""
    spans = tuple(Span(path, "out") for path in inputs) + (Span(out, "in", masked=True),)
    return UnitSpec("neuron", owner, 1, count, spans, out, "neurons", share_floor=True)


def span_channels(span: Span, units: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Channel indices of ``units`` (local indices) in ``span`` of a group of ``count`` units ``width`` channels
    wide (the span's own width, if it has one, wins)."""
    width = channels_per_unit(span, width)
    return block_channels(units, width, span.repeats, stride=count * width)


class UnitMaskHook:
    """Scales a span's channels by the owner's soft mask (a forward hook on an 'out' span, a pre-hook on an 'in'
    span). It reads the buffer at call time, so a ``copy.deepcopy`` of the model re-targets it."""

    def __init__(self, owner: nn.Module, kind: str, width: int, repeats: int = 1) -> None:
        self.owner, self.kind, self.width, self.repeats = owner, kind, width, repeats

    def scale(self, dtype: torch.dtype) -> torch.Tensor | None:
        mask = getattr(self.owner, mask_buffer(self.kind), None)
        if mask is None:
            return None
        scale = mask.to(dtype)
        if self.width > 1:
            scale = scale.repeat_interleave(self.width)
        return scale.repeat(self.repeats) if self.repeats > 1 else scale

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor | None = None):
        if output is not None:  # forward hook: the span's output rows
            scale = self.scale(output.dtype)
            return output if scale is None else output * scale
        scale = self.scale(args[0].dtype)  # pre-hook: the span's input columns
        return args if scale is None else (args[0] * scale, *args[1:])


MASK_HOOK_TYPES = (UnitMaskHook,)


def _has_kind_hook(linear: nn.Module, kind: str) -> bool:
    hooks = (*linear._forward_hooks.values(), *linear._forward_pre_hooks.values())
    return any(isinstance(h, UnitMaskHook) and h.kind == kind for h in hooks)


def install_mask_hooks(layer: nn.Module, spec: UnitSpec) -> None:
    """Hook the kind's masked spans in ``layer`` (idempotent). An 'in' hook is prepended, so the mask acts before
    any input capture (statistics)."""
    owner = layer.get_submodule(spec.owner)
    for span in spec.spans:
        linear = layer.get_submodule(span.path)
        if not span.masked or _has_kind_hook(linear, spec.kind):
            continue
        hook = UnitMaskHook(owner, spec.kind, spec.span_width(span), span.repeats)
        if span.axis == "out":
            linear.register_forward_hook(hook)
        else:
            linear.register_forward_pre_hook(hook, prepend=True)


def dense_index(layer: nn.Module, spec: UnitSpec) -> list[int]:
    """Original (dense) indices of the units of kind ``spec`` that ``layer`` still has."""
    idx = getattr(layer.get_submodule(spec.owner), spec.index_attr, None)
    return list(range(spec.dense)) if idx is None else list(idx)


def mask_of(layer: nn.Module, spec: UnitSpec) -> torch.Tensor | None:
    """The soft mask of ``layer``'s units of kind ``spec`` (None: unmasked)."""
    return getattr(layer.get_submodule(spec.owner), spec.mask_buffer, None)


def kept(layer: nn.Module, spec: UnitSpec) -> list[int]:
    """Current-local indices of the units whose mask is non-zero (all when unmasked)."""
    mask = mask_of(layer, spec)
    if mask is None:
        return list(range(len(dense_index(layer, spec))))
    return torch.nonzero(mask > 0).flatten().tolist()


def set_mask(layer: nn.Module, spec: UnitSpec, values: torch.Tensor) -> None:
    """Install the kind's hooks and store ``values`` (validated by the caller) on the owner's device."""
    owner = layer.get_submodule(spec.owner)
    install_mask_hooks(layer, spec)
    masks.set_mask_buffer(owner, spec.mask_buffer, values.to(next(owner.parameters()).device))


def slice_units(layer: nn.Module, spec: UnitSpec, keep: list[int]) -> None:
    """Physically keep units ``keep`` (local indices) of ``layer``'s group: every span's channels, the owner's
    original indices, count and width attributes. A no-op when every unit stays."""
    dense = dense_index(layer, spec)
    count = len(dense)
    if len(keep) == count:
        return
    units = torch.tensor(keep, dtype=torch.long)
    for span in spec.spans:
        channels = span_channels(span, units, spec.width, count)
        cut = slice_linear_out if span.axis == "out" else slice_linear_in
        replace_submodule(layer, span.path, cut(layer.get_submodule(span.path), channels))
    owner = layer.get_submodule(spec.owner)
    setattr(owner, spec.index_attr, [dense[u] for u in keep])
    for attr in spec.count_attrs:
        setattr(owner, attr, len(keep))
    for attr in spec.width_attrs:
        setattr(owner, attr, len(keep) * spec.width)
