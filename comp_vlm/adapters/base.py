"""The adapter protocol: how the model-agnostic algorithm reaches one model family.

How to add a family
-------------------
1. Write ``comp_vlm/adapters/<family>.py`` with a :class:`ModelAdapter` subclass decorated with
   :func:`register_adapter`. Set ``family`` and ``model_classes``; set the other class attributes under "what a
   family may set" (``attn_implementation``, ``auto_classes``, ``supports_dead_compute``, ``token_reducers``,
   ``key_projection``) where the default does not fit.
2. Implement the abstract hooks: :meth:`~ModelAdapter.tower_specs` (the towers and their prunable units, as data),
   :meth:`~ModelAdapter.default_reference` and :meth:`~ModelAdapter.tower_io` (the FLOPs reference), and
   :meth:`~ModelAdapter._install_forward` / :meth:`~ModelAdapter._uninstall_forward` (the instance forwards).
3. Override the optional hooks where the default does not fit: :meth:`~ModelAdapter.layer_fields`,
   :meth:`~ModelAdapter.pool_tokens`, :meth:`~ModelAdapter.output_token_flops` (a pooling head reading every
   kept token), :meth:`~ModelAdapter.couplings`, :meth:`~ModelAdapter.layer_runtime`,
   :meth:`~ModelAdapter.validate_recipe` (to add checks, then call ``super()``).
4. Write the forwards :meth:`~ModelAdapter._install_forward` puts on the instance (no class is patched). A tower
   forward starts a :class:`comp_vlm.tokens.TokenState` (through :func:`comp_vlm.adapters.runtime.label_pools`),
   runs every layer through the layer's ``comp_runtime`` (:class:`comp_vlm.adapters.runtime.SiteRuntime`: ``run``,
   ``start``, ``after_attention``, ``site``, ``after_mlp``) and calls :func:`comp_vlm.adapters.runtime.end_tower`
   after its layer loop (the collector weights the last MLP's statistic there). This is the one duty the base
   class cannot perform; ``tests/test_family_protocol.py`` checks it for every contract case.
5. Add a contract case for every model class to ``tests/contract/families.py`` and the family's tasks and tests.

What the base class does for every family (a family does none of it): :meth:`~ModelAdapter.install` switches a
family built with ``sdpa`` to the ``comp_vlm`` attention (:func:`comp_vlm.adapters.common.use_comp_attention`),
puts :meth:`~ModelAdapter.layer_runtime`'s runtime on every layer as ``comp_runtime``, calls the family's
:meth:`~ModelAdapter._install_forward` and sets the installed flag; :meth:`~ModelAdapter.uninstall` undoes each.
Every member other than these hooks, the class attributes and ``__init__`` is the generic algorithm, marked
``@final``: a subclass that overrides one is refused when the class is created (TypeError,
:meth:`ModelAdapter.__init_subclass__`). A family adds its own helpers freely.

An adapter is a thin *view* over a model instance; every piece of pruning state (mask buffers, keep ratios,
original unit indices, options) lives on the model's own modules, so a ``copy.deepcopy`` of the model carries it
and a new view (``get_adapter(model)``) sees it. Masks, statistics, structure for FLOPs, physical slicing and
recipes are generic over unit groups (:class:`comp_vlm.adapters.units.UnitSpec`) and live here once.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, final

import torch
from torch import nn

from .. import masks
from ..errors import ConfigError, RecipeError, UnsupportedModelError
from ..flops import model_flops, unit_flops
from ..recipe import LEGACY_OPTIONS, TOKEN_POOL, LayerRecipe, Recipe
from ..structure import PARAM_MODES, TOKEN_MODES, Coupling, LayerStructure, TowerStructure
from ..validation import validate_dataclass
from . import units
from .common import restore_sdpa, use_comp_attention
from .runtime import (
    KEEP_ATTR,
    KeyCapture,
    PoolLabels,
    SiteRuntime,
    TokenPool,
    TokenScorer,
    make_token_scorer,
    set_site_keep,
    site_keep,
)
from .units import UnitGroup, UnitKey, UnitSpec

OPTIONS_ATTR = "comp_vlm_options"
SCORER_ATTR = "comp_vlm_token_scorer"  # the TokenScorer the installed sites use
INSTALLED_ATTR = "_comp_vlm_installed"  # on the model: ModelAdapter.install ran
RUNTIME_ATTR = "comp_runtime"  # on every layer: its SiteRuntime (the runtime and the forwards read it by this name)


@dataclass(frozen=True)
class TowerSpec:
    """One transformer stack of a model (a vision tower, a text encoder, an LLM).

    Its token sites prune the tower's token ``pools`` (each with a name and a token mode), the tokens split among
    them by ``pool_labels`` (:data:`comp_vlm.adapters.runtime.PoolLabels`), e.g. LLaVA's image (T_v) and
    instruction (T_l) tokens in one LLM sequence. ``token_mode`` is the one-pool shorthand: a pool
    :data:`TOKEN_POOL` of that mode holding every prunable token (CLIP); None and no pools: no token sites.
    """

    name: str
    param_mode: str
    token_mode: str | None
    layers_path: str
    num_heads: int
    head_dim: int
    hidden: int
    neurons: int
    causal: bool
    units: tuple[UnitSpec, ...]  # the kinds of prunable unit in each layer, in selection order
    mlp_matrices: int = 2
    pools: tuple[TokenPool, ...] = ()
    pool_labels: PoolLabels | None = None

    def site_pools(self) -> tuple[TokenPool, ...]:
        """The token pools its sites prune: ``pools``, else the ``token_mode`` shorthand's one pool."""
        if self.pools:
            return self.pools
        return (TokenPool(TOKEN_POOL, self.token_mode),) if self.token_mode is not None else ()

    def unit(self, kind: str) -> UnitSpec:
        for spec in self.units:
            if spec.kind == kind:
                return spec
        raise ConfigError(f"tower {self.name!r} has no {kind!r} units (kinds: {[u.kind for u in self.units]})")

    def unit_mode(self, unit: UnitSpec) -> str:
        """The parameter mode of ``unit``'s groups: its own, else the tower's."""
        return self.param_mode if unit.mode is None else unit.mode


def check_tower_specs(specs: list[TowerSpec]) -> None:
    """Raise ConfigError if a unit kind's parameter mode is not one of :data:`comp_vlm.structure.PARAM_MODES`, or
    a tower's token pools are ill-formed (a mode outside :data:`comp_vlm.structure.TOKEN_MODES`, a repeated name,
    both ``token_mode`` and ``pools``, several pools and no ``pool_labels``)."""
    for spec in specs:
        for unit in spec.units:
            mode = spec.unit_mode(unit)
            if mode not in PARAM_MODES:
                raise ConfigError(f"tower {spec.name!r}: {unit.kind!r} units have mode {mode!r}, not a parameter "
                                  f"mode ({', '.join(PARAM_MODES)})")
        pools = spec.site_pools()
        names = [pool.name for pool in pools]
        problem = (
            "give token_mode (one pool) or pools, not both" if spec.pools and spec.token_mode is not None
            else f"token pool names {names} repeat" if len(set(names)) < len(names)
            else "several token pools need pool_labels" if len(pools) > 1 and spec.pool_labels is None
            else next((f"token pool {p.name!r} has mode {p.mode!r}, not a token mode ({', '.join(TOKEN_MODES)})"
                       for p in pools if p.mode not in TOKEN_MODES), None)
        )
        if problem:
            raise ConfigError(f"tower {spec.name!r}: {problem}")


def structure_fields(spec: TowerSpec, counts: dict[str, int]) -> dict[str, int]:
    """The :class:`LayerStructure` fields of a layer of ``spec`` holding ``counts[kind]`` units of each kind."""
    fields: dict[str, int] = {}
    for unit in spec.units:
        fields.update(unit.structure_counts(counts[unit.kind]))
    return fields


@dataclass
class AdapterOptions:
    """Options that change what the model computes (so they are part of a recipe).

    ``dead_compute``: CLIP only -- run each tower's last-layer MLP on the pooled token alone (method.md §1).
    ``site_start``/``site_every``: token sites sit at layers site_start, site_start+site_every, ...
    ``cit``: token scores see the soft head masks (Eq. 7); False gives the no-cit ablation (search-time only:
    a sliced model has no masks, so this does not change what it computes).
    ``token_scorer``/``token_scorer_seed``: the built-in scorer the sites rank tokens by (runtime.TOKEN_SCORERS) and
    its seed (read only by scorers that draw random numbers).
    ``token_reducer``: what a site does with the tokens it does not keep (runtime.TOKEN_REDUCERS).
    """

    dead_compute: bool = True
    site_start: int = 1
    site_every: int = 1
    cit: bool = True
    token_scorer: str = "attention"
    token_scorer_seed: int = 0
    token_reducer: str = "drop"

    def __post_init__(self) -> None:
        validate_dataclass(self)  # the rules of PruneConfig's fields of the same names (validation.RANGES, CONTENT)


def options_from_recipe(options: dict) -> AdapterOptions:
    """AdapterOptions from a recipe's JSON, type-checked (a recipe is untrusted input); an option it lacks takes its
    legacy value (:data:`comp_vlm.recipe.LEGACY_OPTIONS`), never the current default."""
    fields = {f: type(v) for f, v in asdict(AdapterOptions()).items()}
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise RecipeError(f"recipe has unknown options {unknown}")
    for key, value in options.items():
        kind = fields[key]
        if type(value) is not kind:  # bool is not int here, and "no" is not a bool
            raise RecipeError(f"recipe option {key!r} must be {kind.__name__}, got {value!r}")
    try:
        return AdapterOptions(**{**LEGACY_OPTIONS, **options})
    except ConfigError as exc:
        raise RecipeError(f"recipe options: {exc}") from None


@dataclass(frozen=True)
class Site:
    """A token pool at a site layer: the site of ``tower``'s layer ``layer`` keeps a ratio of pool ``pool``, which
    stages of token mode ``mode`` set."""

    tower: str
    mode: str
    layer: int
    pool: str = TOKEN_POOL


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
    """Protocol + generic implementation (see "How to add a family" above). A family sets the class attributes
    below, implements the abstract hooks and may override the optional ones; every ``@final`` member is generic.
    Construction checks the unit kinds' modes and the token pools (ConfigError)."""

    # ---- what a family must set ------------------------------------------------------------------------------
    #: the family's name, as recipes and presets name it (several adapter classes may share it: BLIP)
    family: ClassVar[str]
    #: the transformers model classes this adapter views (:func:`get_adapter` matches exact classes first)
    model_classes: ClassVar[tuple[type, ...]]

    # ---- what a family may set -------------------------------------------------------------------------------
    #: what comp-vlm builds the family's models with (``io.load_pruned``, ``bench``'s dense models, the presets);
    #: ``"sdpa"`` models run the ``comp_vlm`` attention while installed; a family whose classes lack sdpa: "eager"
    attn_implementation: ClassVar[str] = "sdpa"
    #: transformers Auto classes whose ``from_pretrained(dir, trust_remote_code=True)`` loads a saved pruned model
    #: (``auto_map``, :mod:`comp_vlm.remote`); a family adds those of its tasks
    auto_classes: ClassVar[tuple[str, ...]] = ("AutoModel",)
    #: whether each tower's last MLP can run on the pooled token alone (``AdapterOptions.dead_compute``)
    supports_dead_compute: ClassVar[bool] = False
    #: the token reducers the family's forwards run (``install`` refuses the others); ``merge`` needs
    #: ``key_projection``
    token_reducers: ClassVar[tuple[str, ...]] = ("drop", "fuse")
    #: path, in a layer, of the key projection whose output the ``merge`` reducer compares (None: no merge)
    key_projection: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a subclass that overrides a ``@final`` member (typing.final is not enforced at runtime) or lists
        ``merge`` without a ``key_projection``."""
        super().__init_subclass__(**kwargs)
        overridden = sorted(set(vars(cls)) & final_members(ModelAdapter))
        if overridden:
            raise TypeError(f"{cls.__name__} overrides {', '.join(overridden)}: ModelAdapter marks them @final "
                            "(generic over families); implement the family hooks instead")
        if "merge" in cls.token_reducers and cls.key_projection is None:
            raise TypeError(f"{cls.__name__} lists token reducer 'merge' but sets no key_projection")

    def __init__(self, model: nn.Module) -> None:
        """A view of ``model``. A family may override it to refuse a config it cannot run (ConfigError), then
        call ``super().__init__``."""
        self.model = model
        check_tower_specs(self.tower_specs())

    # ---- what a family must implement ------------------------------------------------------------------------
    @abstractmethod
    def tower_specs(self) -> list[TowerSpec]:
        """The model's towers, from its config (dense sizes), in a fixed order. Each names its layers' module path
        and its prunable units (:class:`UnitSpec`: the contract slices them and checks masked == sliced)."""

    @abstractmethod
    def default_reference(self) -> dict:
        """The reference input shape for FLOPs when none is given (e.g. ``image_size``, ``text_length``); the
        contract counts FLOPs at a case's reference with these keys."""

    @abstractmethod
    def tower_io(self, spec: TowerSpec, reference: dict) -> tuple[int, int, int]:
        """(tokens entering layer 0, tokens always kept, FLOPs outside the layers) of ``spec`` at ``reference``;
        with the layers' structure they must sum to what ``FlopCounterMode`` counts (the contract checks it)."""

    @abstractmethod
    def _install_forward(self) -> None:
        """Put the family's instance forwards (tower forwards, layer forwards, call hooks) on the model; idempotent.
        Called by :meth:`install` after every layer has its ``comp_runtime``; the tower forwards call
        :func:`comp_vlm.adapters.runtime.end_tower` after their layer loop. With every keep ratio at 1 and no mask
        the model must compute what it computed before (the contract's keep-all check)."""

    @abstractmethod
    def _uninstall_forward(self) -> None:
        """Remove what :meth:`_install_forward` put on the model (the class forwards run again)."""

    # ---- what a family may override --------------------------------------------------------------------------
    def layer_fields(self, spec: TowerSpec, layer: int) -> dict[str, Any]:
        """Further :class:`LayerStructure` fields of layer ``layer`` of ``spec`` (e.g. ``cross_kv_hidden``,
        ``kv_heads``) for the FLOPs model; none by default. The unit kinds' counts override these."""
        return {}

    def pool_tokens(self, spec: TowerSpec, reference: dict, prunable: int) -> dict[str, int]:
        """How the ``prunable`` tokens entering ``spec``'s first layer at ``reference`` (those of :meth:`tower_io`
        that are not always kept) split among its token pools, for the FLOPs model: all in its one pool by default.
        A family with several pools in a tower says it here (tokens a ``token_span`` coupling brings are counted
        apart: the coupling names their pool)."""
        pools = spec.site_pools()
        if len(pools) > 1:
            raise ConfigError(f"{self.family} adapter: tower {spec.name!r} has token pools "
                              f"{[p.name for p in pools]}; override pool_tokens to count each")
        return {pools[0].name: prunable} if pools else {}

    def output_token_flops(self, spec: TowerSpec, reference: dict) -> int:
        """FLOPs outside ``spec``'s layers per token leaving its last layer at ``reference`` (a pooling head that
        reads every kept token: SigLIP's attention-pooling head); 0 by default (the tower pools one token, and
        :meth:`tower_io` counts its head). The FLOPs model multiplies it by the tokens the sites leave."""
        return 0

    def couplings(self) -> tuple[Coupling, ...]:
        """How the towers feed one another (cross-attention K/V, an input span), for the FLOPs model; none by
        default. A family with couplings declares them here and nothing else (method.md §1)."""
        return ()

    def layer_runtime(self, spec: TowerSpec, index: int) -> SiteRuntime:
        """The :class:`SiteRuntime` :meth:`install` puts on layer ``index`` of ``spec`` as ``comp_runtime``. By
        default the head statistic is the input of the first unit kind's ``stat_path`` (the attention), the neuron
        statistic that of the ``neuron`` kind's, and the sites run the options' reducer."""
        attention = spec.units[0]
        last = index == len(self.layers(spec)) - 1
        return SiteRuntime(spec.name, index, spec.causal, spec.site_pools(), self.token_scorer, attention.stat_path,
                           spec.unit("neuron").stat_path, self.pooled_only_last_mlp() and last, self.options.cit,
                           spec.pool_labels, self.options.token_reducer, self.key_projection, attention.kind)

    # ---- options / install (generic) -------------------------------------------------------------------------
    @final
    def pooled_only_last_mlp(self) -> bool:
        """Whether each tower's last MLP runs on the pooled token alone (dead compute)."""
        return self.supports_dead_compute and self.options.dead_compute

    @property
    @final
    def options(self) -> AdapterOptions:
        """The installed options (the defaults before :meth:`install`)."""
        opts = getattr(self.model, OPTIONS_ATTR, None)
        return opts if opts is not None else AdapterOptions()

    @property
    @final
    def token_scorer(self) -> TokenScorer:
        """The scorer the token sites rank tokens by (set at :meth:`install`)."""
        scorer = getattr(self.model, SCORER_ATTR, None)
        return scorer if scorer is not None else make_token_scorer(self.options.token_scorer,
                                                                   self.options.token_scorer_seed)

    @final
    def install(self, options: AdapterOptions | None = None, scorer: TokenScorer | None = None) -> ModelAdapter:
        """Install token sites (all keep ratios 1) and options on the instance; idempotent. The sites rank tokens by
        ``scorer`` if given (a custom scorer is not part of the recipe), else by the one already installed, else by
        the one ``options.token_scorer`` names. Raises ConfigError on a reducer the family cannot run.

        Performs the family duties: the ``comp_vlm`` attention (an ``sdpa`` family), every layer's
        ``comp_runtime`` (:meth:`layer_runtime`), the family's forwards (:meth:`_install_forward`), the flag."""
        reducer = (options or self.options).token_reducer
        if reducer not in self.token_reducers:
            raise ConfigError(f"the {self.family} adapter cannot run token_reducer {reducer!r} (it runs "
                              f"{', '.join(self.token_reducers)})")
        if options is not None:
            if asdict(options) != asdict(self.options):
                if self.is_installed():
                    self.uninstall()
                self.model.__dict__.pop(SCORER_ATTR, None)
            object.__setattr__(self.model, OPTIONS_ATTR, options)
        elif getattr(self.model, OPTIONS_ATTR, None) is None:
            object.__setattr__(self.model, OPTIONS_ATTR, AdapterOptions())
        object.__setattr__(self.model, SCORER_ATTR, scorer if scorer is not None else self.token_scorer)
        if self.attn_implementation == "sdpa":
            use_comp_attention(self.model)
        for spec in self.tower_specs():
            for i, layer in enumerate(self.layers(spec)):
                layer.__dict__[RUNTIME_ATTR] = self.layer_runtime(spec, i)
        self._install_forward()
        object.__setattr__(self.model, INSTALLED_ATTR, True)
        return self

    @final
    def is_installed(self) -> bool:
        """Whether :meth:`install` ran (and :meth:`uninstall` did not since)."""
        return getattr(self.model, INSTALLED_ATTR, False)

    @final
    def uninstall(self) -> None:
        """Remove token sites, masks and options: the model computes exactly as before (weights untouched)."""
        self.clear_masks()
        self._uninstall_forward()
        for spec in self.tower_specs():
            for layer in self.layers(spec):
                for attr in (KEEP_ATTR, RUNTIME_ATTR):
                    layer.__dict__.pop(attr, None)
                if self.key_projection is not None:
                    masks.remove_hooks(layer.get_submodule(self.key_projection), (KeyCapture,))
        restore_sdpa(self.model)
        for attr in (OPTIONS_ATTR, SCORER_ATTR, INSTALLED_ATTR):
            self.model.__dict__.pop(attr, None)

    # ---- towers, layers, units -------------------------------------------------------------------------------
    @final
    def tower(self, name: str) -> TowerSpec:
        """The tower named ``name`` (ConfigError naming the towers if there is none)."""
        for spec in self.tower_specs():
            if spec.name == name:
                return spec
        raise ConfigError(f"{self.family} model has no tower {name!r} (towers: {[s.name for s in self.tower_specs()]})")

    @final
    def layers(self, spec: TowerSpec) -> nn.ModuleList:
        """The layer modules of ``spec`` (at its ``layers_path``)."""
        return self.model.get_submodule(spec.layers_path)

    @final
    def unit_groups(self, mode: str | None = None) -> list[UnitGroup]:
        """Every layer's groups of prunable units (tower by tower, layer by layer, kinds in tower order); with
        ``mode``, only the groups of that parameter mode."""
        return [
            UnitGroup(unit, spec.name, spec.unit_mode(unit), i, len(units.dense_index(layer, unit)))
            for spec in self.tower_specs()
            for i, layer in enumerate(self.layers(spec))
            for unit in spec.units if mode is None or spec.unit_mode(unit) == mode
        ]

    param_groups = unit_groups  # protocol v1 name (README)

    @final
    def unit_group(self, key: UnitGroup | UnitKey) -> UnitGroup:
        """The group of a (kind, tower, layer) key (a group is passed through)."""
        if isinstance(key, UnitGroup):
            return key
        kind, tower, layer = key
        spec = self.tower(tower)
        unit = spec.unit(kind)
        return UnitGroup(unit, tower, spec.unit_mode(unit), layer,
                         len(units.dense_index(self.layers(spec)[layer], unit)))

    @final
    def _layer(self, group: UnitGroup) -> nn.Module:
        return self.layers(self.tower(group.tower))[group.layer]

    @final
    def dense_index(self, key: UnitGroup | UnitKey) -> list[int]:
        """Original (dense) indices of the units the layer still has."""
        group = self.unit_group(key)
        return units.dense_index(self._layer(group), group.spec)

    @final
    def unit_flops(self, group: UnitGroup, layer: LayerStructure, tokens_in: int, tokens_mlp: int) -> int:
        """FLOPs of one unit of ``group`` (:func:`comp_vlm.flops.unit_flops`) at the given token counts."""
        return unit_flops(group.kind, layer, tokens_in, tokens_mlp)

    @final
    def site_layers(self, spec: TowerSpec, options: AdapterOptions | None = None) -> list[int]:
        """Layers holding a token site: site_start, +site_every, ... (not the last one under dead compute,
        where only the pooled token reaches the MLP anyway)."""
        if not spec.site_pools():
            return []
        opts = self.options if options is None else options
        n = len(self.layers(spec))
        last = n - 1 if (self.supports_dead_compute and opts.dead_compute) else n
        return list(range(opts.site_start, last, opts.site_every))

    @final
    def token_sites(self, mode: str | None = None) -> list[Site]:
        """Every token pool at every site layer (tower by tower, layer by layer, pools in tower order); with
        ``mode``, only the pools of that token mode."""
        return [
            Site(spec.name, pool.mode, i, pool.name)
            for spec in self.tower_specs()
            for i in self.site_layers(spec)
            for pool in spec.site_pools() if mode is None or pool.mode == mode
        ]

    @final
    def modes(self) -> list[str]:
        """The pruning modes this model offers, tower by tower: its unit kinds' parameter modes, then its token
        pools' modes (only if it has at least one site)."""
        found = []
        for spec in self.tower_specs():
            tokens = [pool.mode for pool in spec.site_pools()] if self.site_layers(spec) else []
            for m in (*map(spec.unit_mode, spec.units), *tokens):
                if m not in found:
                    found.append(m)
        return found

    # ---- soft masks --------------------------------------------------------------------------------------------
    @final
    def _check_mask(self, values: torch.Tensor | list, size: int, what: str) -> torch.Tensor:
        values = torch.as_tensor(values, dtype=torch.float32)
        if values.shape != (size,):
            raise ConfigError(f"{what} mask must have shape ({size},), got {tuple(values.shape)}")
        if not torch.isfinite(values).all() or (values < 0).any() or (values > 1).any():
            raise ConfigError(f"{what} mask values must lie in [0, 1]")
        return values

    @final
    def set_unit_mask(self, key: UnitGroup | UnitKey, values: torch.Tensor | list) -> None:
        """Soft mask in [0, 1] of a group's units (current local order)."""
        group = self.unit_group(key)
        values = self._check_mask(values, group.size, f"{group.tower} layer {group.layer} {group.kind}")
        units.set_mask(self._layer(group), group.spec, values)

    @final
    def unit_mask(self, key: UnitGroup | UnitKey) -> torch.Tensor | None:
        """The group's soft mask (None: unmasked)."""
        group = self.unit_group(key)
        return units.mask_of(self._layer(group), group.spec)

    @final
    def set_head_mask(self, tower: str, layer: int, values: torch.Tensor | list) -> None:
        """Protocol v1: ``set_unit_mask(("head", tower, layer), values)``."""
        self.set_unit_mask(("head", tower, layer), values)

    @final
    def set_neuron_mask(self, tower: str, layer: int, values: torch.Tensor | list) -> None:
        """Protocol v1: ``set_unit_mask(("neuron", tower, layer), values)``."""
        self.set_unit_mask(("neuron", tower, layer), values)

    @final
    def clear_masks(self) -> None:
        """Drop every unit mask and its hooks."""
        for spec in self.tower_specs():
            for module in self.layers(spec):
                for unit in spec.units:
                    masks.clear_mask_buffer(module.get_submodule(unit.owner), unit.mask_buffer)
                for sub in module.modules():
                    masks.remove_hooks(sub, units.MASK_HOOK_TYPES)

    @final
    def kept_units(self, key: UnitGroup | UnitKey) -> list[int]:
        """Current-local indices of the group's units whose mask is non-zero (all when unmasked)."""
        group = self.unit_group(key)
        return units.kept(self._layer(group), group.spec)

    # ---- statistics collection (CIM) -----------------------------------------------------------------------
    @final
    def attach_collector(self, collector: Any) -> None:
        """Let the layers feed ``collector`` (a :class:`comp_vlm.collect.StatsCollector`) during training."""
        from ..collect import capture_input_hook

        self.install()
        for spec in self.tower_specs():
            for layer in self.layers(spec):
                layer.comp_collector = collector
                for unit in spec.units:
                    lin = layer.get_submodule(unit.stat_path)
                    if not any(h is capture_input_hook for h in lin._forward_pre_hooks.values()):
                        lin.register_forward_pre_hook(capture_input_hook)

    @final
    def unit_scores(self, key: UnitGroup | UnitKey, collector: Any) -> torch.Tensor | None:
        """The group's importance scores from ``collector``'s statistics (None if it has none for the group)."""
        group = self.unit_group(key)
        stat_linear = self._layer(group).get_submodule(group.spec.stat_path)
        return collector.unit_scores(group.key, stat_linear.weight, group.spec.stat_width)

    @final
    def detach_collector(self) -> None:
        """Undo :meth:`attach_collector`."""
        from ..collect import CAPTURE_FLAG, CAPTURED, capture_input_hook

        for spec in self.tower_specs():
            for layer in self.layers(spec):
                layer.__dict__.pop("comp_collector", None)
                for unit in spec.units:
                    lin = layer.get_submodule(unit.stat_path)
                    for key in [k for k, h in lin._forward_pre_hooks.items() if h is capture_input_hook]:
                        del lin._forward_pre_hooks[key]
                    lin.__dict__.pop(CAPTURE_FLAG, None)
                    lin.__dict__.pop(CAPTURED, None)

    # ---- token sites ---------------------------------------------------------------------------------------------
    @final
    def _pool(self, spec: TowerSpec, pool: str) -> TokenPool:
        for found in spec.site_pools():
            if found.name == pool:
                return found
        raise ConfigError(f"tower {spec.name!r} has no token pool {pool!r} "
                          f"(pools: {[p.name for p in spec.site_pools()]})")

    @final
    def set_keep_ratio(self, tower: str, layer: int, ratio: float, pool: str = TOKEN_POOL) -> None:
        """Set the keep ratio of token pool ``pool`` at the site of ``tower``'s layer ``layer``."""
        spec = self.tower(tower)
        if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
            raise ConfigError(f"keep ratio must lie in (0, 1], got {ratio!r} ({tower} layer {layer})")
        self._pool(spec, pool)
        if layer not in self.site_layers(spec):
            raise ConfigError(f"{tower} layer {layer} has no token site (sites: {self.site_layers(spec)})")
        set_site_keep(self.layers(spec)[layer], pool, ratio)

    @final
    def keep_ratio(self, tower: str, layer: int, pool: str = TOKEN_POOL) -> float:
        """The keep ratio of token pool ``pool`` at ``tower``'s layer ``layer`` (1: no site, or it keeps all)."""
        spec = self.tower(tower)
        return site_keep(self.layers(spec)[layer], self._pool(spec, pool).name)

    # ---- structure and FLOPs -------------------------------------------------------------------------------------
    @final
    def reference(self, reference: dict | None = None) -> dict:
        """The FLOPs reference: :meth:`default_reference`, updated by ``reference`` (else by the recipe's)."""
        ref = dict(self.default_reference())
        ref.update(reference or getattr(self.model, "comp_vlm_reference", None) or {})
        return ref

    @final
    def structure(self, reference: dict | None = None) -> list[TowerStructure]:
        """What the model computes now (masked-out units count as removed), at the reference shape."""
        ref = self.reference(reference)
        pooled_only = self.pooled_only_last_mlp()
        towers = []
        for spec in self.tower_specs():
            sites = set(self.site_layers(spec))
            layers = []
            n_layers = len(self.layers(spec))
            for i, module in enumerate(self.layers(spec)):
                keeps = {p.name: site_keep(module, p.name) for p in spec.site_pools()} if i in sites else {}
                layer = LayerStructure(
                    hidden=spec.hidden,
                    heads=0,
                    head_dim=spec.head_dim,
                    neurons=0,
                    mlp_matrices=spec.mlp_matrices,
                    site_keep={p: r for p, r in keeps.items() if r < 1.0} or None,
                    mlp_tokens_pooled_only=pooled_only and i == n_layers - 1,
                )
                kept = structure_fields(spec, {u.kind: len(units.kept(module, u)) for u in spec.units})
                layers.append(replace(layer, **{**self.layer_fields(spec, i), **kept}))
            tokens, always, extra = self.tower_io(spec, ref)
            pools = tuple(self.pool_tokens(spec, ref, tokens - always).items())
            towers.append(TowerStructure(spec.name, tokens, always, tuple(layers), extra, pools=pools,
                                         reducer=self.options.token_reducer,
                                         output_token_flops=self.output_token_flops(spec, ref)))
        return towers

    @final
    def count_flops(self, reference: dict | None = None) -> int:
        """FLOPs of what the model computes now, all towers together (:func:`comp_vlm.flops.model_flops`)."""
        return model_flops(self.structure(reference), self.couplings())

    @final
    def dense_flops(self, reference: dict | None = None) -> int:
        """FLOPs of the unpruned model with the same options (:meth:`dense_structure`)."""
        return model_flops(self.dense_structure(reference), self.couplings())

    @final
    def dense_structure(self, reference: dict | None = None) -> list[TowerStructure]:
        """The unpruned model (all units, all tokens) with the same options."""
        return [replace(t, layers=tuple(replace(dense_units(lay, self.tower(t.name)), site_keep=None)
                                        for lay in t.layers))
                for t in self.structure(reference)]

    # ---- physical slicing ----------------------------------------------------------------------------------------
    @final
    def slice(self) -> None:
        """Physically remove every unit whose mask is 0 (masks must be hard 0/1); then drop the masks."""
        plan = []
        for group in self.unit_groups():
            mask = self.unit_mask(group)
            if mask is not None and ((mask > 0) & (mask < 1)).any():
                raise ConfigError(f"{group.tower} layer {group.layer} {group.kind} mask is soft; harden it to 0/1 "
                                  "before slicing")
            plan.append((group, self.kept_units(group)))
        self.clear_masks()
        for group, keep in plan:
            self.slice_units(group, keep)

    @final
    def slice_units(self, key: UnitGroup | UnitKey, keep: list[int]) -> None:
        """Keep the group's units ``keep`` (current local indices) and physically drop the others."""
        group = self.unit_group(key)
        units.slice_units(self._layer(group), group.spec, keep)

    # ---- recipes ---------------------------------------------------------------------------------------------------
    @final
    def base_config_hash(self) -> str:
        """:func:`config_hash` of the model's config (recipes carry it)."""
        return config_hash(self.model.config)

    @final
    def token_pools(self, spec: TowerSpec) -> tuple[str, ...]:
        """The names of the token pools a site of the tower holds, as recipes name them (CLIP: one, ``TOKEN_POOL``)."""
        return tuple(pool.name for pool in spec.site_pools())

    @final
    def recipe(self, reference: dict | None = None) -> Recipe:
        """The current structure (kept units in dense indices, keep ratios, options) as a recipe."""
        ref = self.reference(reference)
        towers = {}
        for spec in self.tower_specs():
            sites = set(self.site_layers(spec))
            layers = []
            for i, module in enumerate(self.layers(spec)):
                kept = {}
                for unit in spec.units:
                    dense = units.dense_index(module, unit)
                    kept[unit.kind] = [dense[u] for u in units.kept(module, unit)]
                ratios = {p: self.keep_ratio(spec.name, i, p) for p in self.token_pools(spec)} if i in sites else {}
                layers.append(LayerRecipe(kept, ratios))
            towers[spec.name] = layers
        return Recipe(
            family=self.family,
            model_class=type(self.model).__name__,
            base_config_hash=self.base_config_hash(),
            options=asdict(self.options),
            reference=ref,
            towers=towers,
            dense_flops=self.dense_flops(ref),
            pruned_flops=self.count_flops(ref),
        )

    def validate_recipe(self, recipe: Recipe) -> None:
        """Raise RecipeError unless ``recipe`` fits this model (family, config hash, towers, layers, unit indices,
        token sites and pools). A family may override it to add its own checks, then call ``super()``."""
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
            kinds = [unit.kind for unit in spec.units]
            for i, lay in enumerate(layers):
                if set(lay.units) != set(kinds):
                    raise RecipeError(f"{name} layer {i}: the recipe's unit kinds {sorted(lay.units)} are not the "
                                      f"model's {sorted(kinds)}")
                for unit in spec.units:  # a LayerRecipe's indices are sorted, unique and >= 0: check the last
                    if lay.units[unit.kind] and lay.units[unit.kind][-1] >= unit.dense:
                        raise RecipeError(f"{name} layer {i}: {unit.kind} index out of range [0, {unit.dense})")
                if lay.keep_ratios and i not in sites:
                    raise RecipeError(f"{name} layer {i} has no token site, but the recipe sets a keep ratio")
                foreign = sorted(set(lay.keep_ratios) - set(self.token_pools(spec)))
                if foreign:
                    raise RecipeError(f"{name} layer {i}: the recipe's token pools {foreign} are not the model's "
                                      f"{list(self.token_pools(spec))}")

    @final
    def apply_recipe(self, recipe: Recipe) -> ModelAdapter:
        """Slice the model to the recipe's structure and install its options and token keep ratios."""
        self.validate_recipe(recipe)
        self.clear_masks()
        self.install(options_from_recipe(recipe.options))
        object.__setattr__(self.model, "comp_vlm_reference", dict(recipe.reference))
        for name, layers in recipe.towers.items():
            spec = self.tower(name)
            for i, (lay, module) in enumerate(zip(layers, self.layers(spec))):
                local = []
                for unit in spec.units:
                    pos = {d: k for k, d in enumerate(units.dense_index(module, unit))}
                    if any(d not in pos for d in lay.kept(unit.kind)):
                        raise RecipeError(f"{name} layer {i}: the recipe keeps units this (already pruned) model lacks")
                    local.append((unit, [pos[d] for d in lay.kept(unit.kind)]))
                for unit, keep in local:
                    units.slice_units(module, unit, keep)
                for pool, ratio in lay.keep_ratios.items():
                    self.set_keep_ratio(name, i, ratio, pool)
        return self


def dense_units(layer: LayerStructure, spec: TowerSpec) -> LayerStructure:
    """``layer`` with every unit kind of ``spec`` back at its dense count."""
    return replace(layer, **structure_fields(spec, {unit.kind: unit.dense for unit in spec.units}))


def final_members(cls: type) -> frozenset[str]:
    """The names of ``cls``'s own members marked ``@final`` (on a property: its getter)."""
    return frozenset(name for name, member in vars(cls).items()
                     if getattr(getattr(member, "fget", member), "__final__", False))


# ---- registry -------------------------------------------------------------------------------------------------------
_REGISTRY: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make ``get_adapter`` use ``cls`` for instances of ``cls.model_classes``."""
    _REGISTRY.append(cls)
    return cls


def adapter_class_for(model_class_name: str) -> tuple[type[ModelAdapter], type]:
    """The registered adapter class for a model class name and that model class."""
    for cls in _REGISTRY:
        for mc in cls.model_classes:
            if mc.__name__ == model_class_name:
                return cls, mc
    raise UnsupportedModelError(f"no comp-vlm adapter for model class {model_class_name!r}")


def registered_model_classes() -> list[type]:
    """Every registered model class, in registration order."""
    return [mc for cls in _REGISTRY for mc in cls.model_classes]


def attn_implementation_for(model_class: type | str) -> str:
    """The attention implementation comp-vlm builds models of ``model_class`` (a class or its name) with."""
    name = model_class if isinstance(model_class, str) else model_class.__name__
    return adapter_class_for(name)[0].attn_implementation


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

