"""The adapter protocol: how the model-agnostic algorithm reaches one model family.

An adapter is a thin *view* over a model instance; every piece of pruning state (mask buffers, keep ratios,
original unit indices, options) lives on the model's own modules, so a ``copy.deepcopy`` of the model carries it
and a new view (``get_adapter(model)``) sees it. A family describes its towers with :class:`TowerSpec` (where the
prunable linears of a layer are) and implements the token machinery (:meth:`ModelAdapter._install_forward`).
Everything else -- masks, structure for FLOPs, physical slicing, recipes -- is generic and lives here once.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .. import masks
from ..errors import ConfigError, RecipeError, UnsupportedModelError
from ..flops import model_flops
from ..recipe import RECIPE_FORMAT_VERSION, LayerRecipe, Recipe
from ..structure import LayerStructure, TowerStructure
from ..surgery import head_channels, replace_submodule, slice_linear_in, slice_linear_out

OPTIONS_ATTR = "comp_vlm_options"


@dataclass(frozen=True)
class LayerParts:
    """Attribute paths, relative to a layer module, of its prunable pieces."""

    attention: str  # module that owns the head mask
    head_in: tuple[tuple[str, int], ...]  # (linear, repeats): linears whose outputs are laid out per head
    head_out: str  # linear whose inputs are laid out per head
    mlp: str  # module that owns the neuron mask
    neuron_in: tuple[str, ...]  # linears whose outputs are the neurons (fc1; gate and up)
    neuron_out: str  # linear whose inputs are the neurons (fc2; down)
    head_count_attrs: tuple[str, ...] = ()  # attributes on the attention module holding the head count


@dataclass(frozen=True)
class TowerSpec:
    """One transformer stack of a model (a vision tower, a text encoder, an LLM)."""

    name: str
    param_mode: str
    token_mode: str | None
    layers_path: str
    num_heads: int
    head_dim: int
    hidden: int
    neurons: int
    causal: bool
    parts: LayerParts
    mlp_matrices: int = 2


@dataclass
class AdapterOptions:
    """Options that change what the model computes (so they are part of a recipe).

    ``dead_compute``: CLIP only -- run each tower's last-layer MLP on the pooled token alone (method.md §1).
    ``site_start``/``site_every``: token sites sit at layers site_start, site_start+site_every, ...
    ``cit``: token scores see the soft head masks (Eq. 7); False gives the no-cit ablation (search-time only:
    a sliced model has no masks, so this does not change what it computes).
    """

    dead_compute: bool = True
    site_start: int = 1
    site_every: int = 1
    cit: bool = True

    def __post_init__(self) -> None:
        if self.site_start < 0 or self.site_every < 1:
            raise ConfigError(f"site_start must be >= 0 and site_every >= 1, got {self.site_start}, {self.site_every}")


def options_from_recipe(options: dict) -> AdapterOptions:
    """AdapterOptions from a recipe's JSON, type-checked (a recipe is untrusted input)."""
    fields = {f: type(v) for f, v in asdict(AdapterOptions()).items()}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise RecipeError(f"recipe has unknown options {unknown}")
    for key, value in options.items():
        kind = fields[key]
        if type(value) is not kind:  # bool is not int here, and "no" is not a bool
            raise RecipeError(f"recipe option {key!r} must be {kind.__name__}, got {value!r}")
    try:
        return AdapterOptions(**options)
    except ConfigError as exc:
        raise RecipeError(f"recipe options: {exc}") from None


@dataclass(frozen=True)
class Site:
    tower: str
    mode: str
    layer: int


@dataclass(frozen=True)
class ParamGroup:
    """The prunable units of one kind in one layer: ``kind`` is 'head' or 'neuron'."""

    tower: str
    mode: str
    layer: int
    kind: str
    size: int


_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype", "_attn_implementation",
    "_attn_implementation_autoset", "_attn_implementation_internal", "output_attentions", "output_hidden_states",
    "return_dict", "use_cache", "comp_vlm", "_commit_hash", "_experts_implementation",
}


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in sorted(obj.items()) if k not in _VOLATILE_CONFIG_KEYS}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def config_hash(config: Any) -> str:
    """Hash of the architecture-relevant fields of a transformers config (volatile/runtime keys excluded)."""
    blob = json.dumps(_stable(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class ModelAdapter(ABC):
    """Protocol + generic implementation. Subclasses set ``family``/``model_classes`` and implement the
    abstract methods; register them with :func:`register_adapter`."""

    family: ClassVar[str]
    model_classes: ClassVar[tuple[type, ...]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- what a family must provide -------------------------------------------------------------------------
    @abstractmethod
    def tower_specs(self) -> list[TowerSpec]:
        """The model's towers, from its config (dense sizes)."""

    @abstractmethod
    def default_reference(self) -> dict:
        """Reference input shape for FLOPs (e.g. image size, text length)."""

    @abstractmethod
    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        """(tokens entering layer 0, tokens always kept, FLOPs outside the layers) at ``reference``."""

    @abstractmethod
    def _install_forward(self) -> None:
        """Install the instance-level forwards (token sites, dead compute). Idempotent."""

    @abstractmethod
    def _uninstall_forward(self) -> None:
        """Restore the class forwards."""

    supports_dead_compute: ClassVar[bool] = False

    def pooled_only_last_mlp(self) -> bool:
        """Whether each tower's last MLP runs on the pooled token alone (dead compute)."""
        return self.supports_dead_compute and self.options.dead_compute

    # ---- options / install -----------------------------------------------------------------------------------
    @property
    def options(self) -> AdapterOptions:
        opts = getattr(self.model, OPTIONS_ATTR, None)
        return opts if opts is not None else AdapterOptions()

    def install(self, options: AdapterOptions | None = None) -> ModelAdapter:
        """Install token sites (all keep ratios 1) and options on the instance; idempotent."""
        if options is not None:
            if self.is_installed() and asdict(options) != asdict(self.options):
                self.uninstall()
            object.__setattr__(self.model, OPTIONS_ATTR, options)
        elif getattr(self.model, OPTIONS_ATTR, None) is None:
            object.__setattr__(self.model, OPTIONS_ATTR, AdapterOptions())
        self._install_forward()
        return self

    def is_installed(self) -> bool:
        return getattr(self.model, "_comp_vlm_installed", False)

    def uninstall(self) -> None:
        """Remove token sites, masks and options: the model computes exactly as before (weights untouched)."""
        self.clear_masks()
        self._uninstall_forward()
        for spec in self.tower_specs():
            for layer in self.layers(spec):
                layer.__dict__.pop("comp_site_keep", None)
        self.model.__dict__.pop(OPTIONS_ATTR, None)

    # ---- towers, layers, units -------------------------------------------------------------------------------
    def tower(self, name: str) -> TowerSpec:
        for spec in self.tower_specs():
            if spec.name == name:
                return spec
        raise ConfigError(f"{self.family} model has no tower {name!r} (towers: {[s.name for s in self.tower_specs()]})")

    def layers(self, spec: TowerSpec) -> nn.ModuleList:
        return self.model.get_submodule(spec.layers_path)

    def attention(self, spec: TowerSpec, layer: int) -> nn.Module:
        return self.layers(spec)[layer].get_submodule(spec.parts.attention)

    def mlp(self, spec: TowerSpec, layer: int) -> nn.Module:
        return self.layers(spec)[layer].get_submodule(spec.parts.mlp)

    def head_index(self, spec: TowerSpec, layer: int) -> list[int]:
        """Original (dense) indices of the heads the layer still has."""
        idx = getattr(self.attention(spec, layer), "comp_head_index", None)
        return list(range(spec.num_heads)) if idx is None else list(idx)

    def neuron_index(self, spec: TowerSpec, layer: int) -> list[int]:
        idx = getattr(self.mlp(spec, layer), "comp_neuron_index", None)
        return list(range(spec.neurons)) if idx is None else list(idx)

    def param_groups(self, mode: str | None = None) -> list[ParamGroup]:
        out = []
        for spec in self.tower_specs():
            if mode is not None and spec.param_mode != mode:
                continue
            for i in range(len(self.layers(spec))):
                out.append(ParamGroup(spec.name, spec.param_mode, i, "head", len(self.head_index(spec, i))))
                out.append(ParamGroup(spec.name, spec.param_mode, i, "neuron", len(self.neuron_index(spec, i))))
        return out

    def site_layers(self, spec: TowerSpec, options: AdapterOptions | None = None) -> list[int]:
        """Layers holding a token site: site_start, +site_every, ... (not the last one under dead compute,
        where only the pooled token reaches the MLP anyway)."""
        if spec.token_mode is None:
            return []
        opts = self.options if options is None else options
        n = len(self.layers(spec))
        last = n - 1 if (self.supports_dead_compute and opts.dead_compute) else n
        return list(range(opts.site_start, last, opts.site_every))

    def token_sites(self, mode: str | None = None) -> list[Site]:
        return [
            Site(spec.name, spec.token_mode, i)
            for spec in self.tower_specs()
            if spec.token_mode is not None and (mode is None or spec.token_mode == mode)
            for i in self.site_layers(spec)
        ]

    def modes(self) -> list[str]:
        """The pruning modes this model offers (a token mode only if it has at least one site)."""
        found = []
        for spec in self.tower_specs():
            token = spec.token_mode if self.site_layers(spec) else None
            for m in (spec.param_mode, token):
                if m is not None and m not in found:
                    found.append(m)
        return found

    # ---- soft masks --------------------------------------------------------------------------------------------
    def _ensure_mask_hooks(self, spec: TowerSpec, layer: int) -> None:
        module = self.layers(spec)[layer]
        attn, mlp = self.attention(spec, layer), self.mlp(spec, layer)
        for path, repeats in spec.parts.head_in:
            lin = module.get_submodule(path)
            if not masks.has_mask_hook(lin):
                lin.register_forward_hook(masks.HeadMaskHook(attn, spec.head_dim, repeats))
        out = module.get_submodule(spec.parts.neuron_out)
        if not masks.has_mask_hook(out):  # prepend: the mask acts before any input capture (statistics)
            out.register_forward_pre_hook(masks.NeuronMaskHook(mlp), prepend=True)

    def _check_mask(self, values: torch.Tensor | list, size: int, what: str) -> torch.Tensor:
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != (size,):
            raise ConfigError(f"{what} mask must have shape ({size},), got {tuple(values.shape)}")
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise ConfigError(f"{what} mask values must lie in [0, 1]")
        return values

    def set_head_mask(self, tower: str, layer: int, values: torch.Tensor | list) -> None:
        spec = self.tower(tower)
        attn = self.attention(spec, layer)
        values = self._check_mask(values, len(self.head_index(spec, layer)), f"{tower} layer {layer} head")
        self._ensure_mask_hooks(spec, layer)
        masks.set_mask_buffer(attn, masks.HEAD_MASK, values.to(next(attn.parameters()).device))

    def set_neuron_mask(self, tower: str, layer: int, values: torch.Tensor | list) -> None:
        spec = self.tower(tower)
        mlp = self.mlp(spec, layer)
        values = self._check_mask(values, len(self.neuron_index(spec, layer)), f"{tower} layer {layer} neuron")
        self._ensure_mask_hooks(spec, layer)
        masks.set_mask_buffer(mlp, masks.NEURON_MASK, values.to(next(mlp.parameters()).device))

    def head_mask(self, tower: str, layer: int) -> torch.Tensor | None:
        spec = self.tower(tower)
        return getattr(self.attention(spec, layer), masks.HEAD_MASK, None)

    def neuron_mask(self, tower: str, layer: int) -> torch.Tensor | None:
        spec = self.tower(tower)
        return getattr(self.mlp(spec, layer), masks.NEURON_MASK, None)

    def clear_masks(self) -> None:
        for spec in self.tower_specs():
            for i, module in enumerate(self.layers(spec)):
                masks.clear_mask_buffer(self.attention(spec, i), masks.HEAD_MASK)
                masks.clear_mask_buffer(self.mlp(spec, i), masks.NEURON_MASK)
                for sub in module.modules():
                    masks.remove_mask_hooks(sub)

    def kept_heads(self, spec: TowerSpec, layer: int) -> list[int]:
        """Current-local indices of heads whose mask is non-zero (all when unmasked)."""
        mask = getattr(self.attention(spec, layer), masks.HEAD_MASK, None)
        n = len(self.head_index(spec, layer))
        return list(range(n)) if mask is None else torch.nonzero(mask > 0).flatten().tolist()

    def kept_neurons(self, spec: TowerSpec, layer: int) -> list[int]:
        mask = getattr(self.mlp(spec, layer), masks.NEURON_MASK, None)
        n = len(self.neuron_index(spec, layer))
        return list(range(n)) if mask is None else torch.nonzero(mask > 0).flatten().tolist()

    # ---- statistics collection (CIM) -----------------------------------------------------------------------
    def attach_collector(self, collector: Any) -> None:
        """Let the layers feed ``collector`` (a :class:`comp_vlm.collect.StatsCollector`) during training."""
        from ..collect import capture_input_hook

        self.install()
        for spec in self.tower_specs():
            for layer in self.layers(spec):
                layer.comp_collector = collector
                for path in (spec.parts.head_out, spec.parts.neuron_out):
                    lin = layer.get_submodule(path)
                    if not any(h is capture_input_hook for h in lin._forward_pre_hooks.values()):
                        lin.register_forward_pre_hook(capture_input_hook)

    def detach_collector(self) -> None:
        from ..collect import CAPTURE_FLAG, CAPTURED, capture_input_hook

        for spec in self.tower_specs():
            for layer in self.layers(spec):
                layer.__dict__.pop("comp_collector", None)
                for path in (spec.parts.head_out, spec.parts.neuron_out):
                    lin = layer.get_submodule(path)
                    for key in [k for k, h in lin._forward_pre_hooks.items() if h is capture_input_hook]:
                        del lin._forward_pre_hooks[key]
                    lin.__dict__.pop(CAPTURE_FLAG, None)
                    lin.__dict__.pop(CAPTURED, None)

    # ---- token sites ---------------------------------------------------------------------------------------------
    def set_keep_ratio(self, tower: str, layer: int, ratio: float) -> None:
        spec = self.tower(tower)
        if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
            raise ConfigError(f"keep ratio must lie in (0, 1], got {ratio!r} ({tower} layer {layer})")
        if layer not in self.site_layers(spec):
            raise ConfigError(f"{tower} layer {layer} has no token site (sites: {self.site_layers(spec)})")
        self.layers(spec)[layer].comp_site_keep = float(ratio)

    def keep_ratio(self, tower: str, layer: int) -> float:
        spec = self.tower(tower)
        return float(getattr(self.layers(spec)[layer], "comp_site_keep", 1.0))

    # ---- structure and FLOPs -------------------------------------------------------------------------------------
    def reference(self, reference: dict | None = None) -> dict:
        ref = dict(self.default_reference())
        ref.update(reference or getattr(self.model, "comp_vlm_reference", None) or {})
        return ref

    def structure(self, reference: dict | None = None) -> list[TowerStructure]:
        """What the model computes now (masked-out units count as removed), at the reference shape."""
        ref = self.reference(reference)
        pooled_only = self.pooled_only_last_mlp()
        towers = []
        for spec in self.tower_specs():
            sites = set(self.site_layers(spec))
            layers = []
            n_layers = len(self.layers(spec))
            for i in range(n_layers):
                keep = self.keep_ratio(spec.name, i) if i in sites else 1.0
                layers.append(
                    LayerStructure(
                        hidden=spec.hidden,
                        heads=len(self.kept_heads(spec, i)),
                        head_dim=spec.head_dim,
                        neurons=len(self.kept_neurons(spec, i)),
                        mlp_matrices=spec.mlp_matrices,
                        site_keep=keep if keep < 1.0 else None,
                        mlp_tokens_pooled_only=pooled_only and i == n_layers - 1,
                    )
                )
            tokens, always, extra = self.tower_io(spec, ref)
            towers.append(TowerStructure(spec.name, tokens, always, tuple(layers), extra))
        return towers

    def count_flops(self, reference: dict | None = None) -> int:
        return model_flops(self.structure(reference))

    def dense_structure(self, reference: dict | None = None) -> list[TowerStructure]:
        """The unpruned model (all units, all tokens) with the same options."""
        out = []
        for t in self.structure(reference):
            spec = self.tower(t.name)
            layers = tuple(
                LayerStructure(spec.hidden, spec.num_heads, spec.head_dim, spec.neurons, spec.mlp_matrices,
                               mlp_tokens_pooled_only=lay.mlp_tokens_pooled_only)
                for lay in t.layers
            )
            out.append(TowerStructure(t.name, t.tokens, t.always_kept, layers, t.extra_flops))
        return out

    # ---- physical slicing ----------------------------------------------------------------------------------------
    def _on_heads_sliced(self, spec: TowerSpec, attention: nn.Module, n_heads: int) -> None:
        for attr in spec.parts.head_count_attrs:
            setattr(attention, attr, n_heads)

    def slice(self) -> None:
        """Physically remove every unit whose mask is 0 (masks must be hard 0/1); then drop the masks."""
        plan = []
        for spec in self.tower_specs():
            for i in range(len(self.layers(spec))):
                for kind, mask in (("head", self.head_mask(spec.name, i)), ("neuron", self.neuron_mask(spec.name, i))):
                    if mask is not None and ((mask > 0) & (mask < 1)).any():
                        raise ConfigError(f"{spec.name} layer {i} {kind} mask is soft; harden it to 0/1 before slicing")
                plan.append((spec, i, self.kept_heads(spec, i), self.kept_neurons(spec, i)))
        self.clear_masks()
        for spec, i, heads, neurons in plan:
            self._slice_layer(spec, i, heads, neurons)

    def _slice_layer(self, spec: TowerSpec, i: int, heads: list[int], neurons: list[int]) -> None:
        module = self.layers(spec)[i]
        attn, mlp = self.attention(spec, i), self.mlp(spec, i)
        head_idx, neuron_idx = self.head_index(spec, i), self.neuron_index(spec, i)
        if len(heads) != len(head_idx):
            keep = torch.tensor(heads, dtype=torch.long)
            width = len(head_idx) * spec.head_dim
            for path, repeats in spec.parts.head_in:
                channels = head_channels(keep, spec.head_dim, repeats, stride=width)
                replace_submodule(module, path, slice_linear_out(module.get_submodule(path), channels))
            channels = head_channels(keep, spec.head_dim)
            out_path = spec.parts.head_out
            replace_submodule(module, out_path, slice_linear_in(module.get_submodule(out_path), channels))
            attn.comp_head_index = [head_idx[h] for h in heads]
            self._on_heads_sliced(spec, attn, len(heads))
        if len(neurons) != len(neuron_idx):
            keep = torch.tensor(neurons, dtype=torch.long)
            for path in spec.parts.neuron_in:
                replace_submodule(module, path, slice_linear_out(module.get_submodule(path), keep))
            out_path = spec.parts.neuron_out
            replace_submodule(module, out_path, slice_linear_in(module.get_submodule(out_path), keep))
            mlp.comp_neuron_index = [neuron_idx[n] for n in neurons]

    # ---- recipes ---------------------------------------------------------------------------------------------------
    def base_config_hash(self) -> str:
        return config_hash(self.model.config)

    def recipe(self, reference: dict | None = None) -> Recipe:
        """The current structure (kept units in dense indices, keep ratios, options) as a recipe."""
        ref = self.reference(reference)
        towers = {}
        for spec in self.tower_specs():
            sites = set(self.site_layers(spec))
            layers = []
            for i in range(len(self.layers(spec))):
                hidx, nidx = self.head_index(spec, i), self.neuron_index(spec, i)
                layers.append(
                    LayerRecipe(
                        heads=[hidx[h] for h in self.kept_heads(spec, i)],
                        neurons=[nidx[n] for n in self.kept_neurons(spec, i)],
                        keep_ratio=self.keep_ratio(spec.name, i) if i in sites else None,
                    )
                )
            towers[spec.name] = layers
        return Recipe(
            format_version=RECIPE_FORMAT_VERSION,
            family=self.family,
            model_class=type(self.model).__name__,
            base_config_hash=self.base_config_hash(),
            options=asdict(self.options),
            reference=ref,
            towers=towers,
            dense_flops=model_flops(self.dense_structure(ref)),
            pruned_flops=self.count_flops(ref),
        )

    def validate_recipe(self, recipe: Recipe) -> None:
        if recipe.family != self.family:
            raise RecipeError(f"recipe is for family {recipe.family!r}, model is {self.family!r}")
        if recipe.base_config_hash != self.base_config_hash():
            raise RecipeError(
                f"recipe base-config hash {recipe.base_config_hash} does not match the model's config "
                f"({self.base_config_hash()}): the recipe was made for a different architecture"
            )
        specs = {s.name: s for s in self.tower_specs()}
        if set(recipe.towers) != set(specs):
            raise RecipeError(f"recipe towers {sorted(recipe.towers)} do not match the model's {sorted(specs)}")
        options = options_from_recipe(recipe.options)
        for name, layers in recipe.towers.items():
            spec = specs[name]
            n = len(self.layers(spec))
            if len(layers) != n:
                raise RecipeError(f"recipe has {len(layers)} {name} layers, the model has {n}")
            sites = set(self.site_layers(spec, options))
            for i, lay in enumerate(layers):
                for what, idx, limit in (("head", lay.heads, spec.num_heads), ("neuron", lay.neurons, spec.neurons)):
                    if any((not isinstance(j, int)) or j < 0 or j >= limit for j in idx):
                        raise RecipeError(f"{name} layer {i}: {what} index out of range [0, {limit})")
                    if sorted(set(idx)) != list(idx):
                        raise RecipeError(f"{name} layer {i}: {what} indices must be sorted and unique")
                if lay.keep_ratio is not None:
                    if not (0.0 < lay.keep_ratio <= 1.0):
                        raise RecipeError(f"{name} layer {i}: keep ratio {lay.keep_ratio} outside (0, 1]")
                    if i not in sites:
                        raise RecipeError(f"{name} layer {i} has no token site, but the recipe sets a keep ratio")

    def apply_recipe(self, recipe: Recipe) -> ModelAdapter:
        """Slice the model to the recipe's structure and install its options and token keep ratios."""
        self.validate_recipe(recipe)
        self.clear_masks()
        self.install(options_from_recipe(recipe.options))
        object.__setattr__(self.model, "comp_vlm_reference", dict(recipe.reference))
        for name, layers in recipe.towers.items():
            spec = self.tower(name)
            for i, lay in enumerate(layers):
                hpos = {h: k for k, h in enumerate(self.head_index(spec, i))}
                npos = {h: k for k, h in enumerate(self.neuron_index(spec, i))}
                missing = [h for h in lay.heads if h not in hpos] + [n for n in lay.neurons if n not in npos]
                if missing:
                    raise RecipeError(f"{name} layer {i}: the recipe keeps units this (already pruned) model lacks")
                self._slice_layer(spec, i, [hpos[h] for h in lay.heads], [npos[n] for n in lay.neurons])
                if lay.keep_ratio is not None:
                    self.set_keep_ratio(name, i, lay.keep_ratio)
        return self


# ---- registry -------------------------------------------------------------------------------------------------------
_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``get_adapter`` use ``cls`` for instances of ``cls.model_classes``."""
    _REGISTRY.append(cls)
    return cls


def adapter_class_for(model_class_name: str) -> tuple[type[ModelAdapter], type]:
    for cls in _REGISTRY:
        for mc in cls.model_classes:
            if mc.__name__ == model_class_name:
                return cls, mc
    raise UnsupportedModelError(f"no comp-vlm adapter for model class {model_class_name!r}")


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter view for ``model`` (exact class match first, then subclasses)."""
    for cls in _REGISTRY:
        if type(model) in cls.model_classes:
            return cls(model)
    for cls in _REGISTRY:
        if isinstance(model, cls.model_classes):
            return cls(model)
    supported = sorted(mc.__name__ for cls in _REGISTRY for mc in cls.model_classes)
    raise UnsupportedModelError(f"unsupported model class {type(model).__name__}; supported: {', '.join(supported)}")

