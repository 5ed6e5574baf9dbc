"""Loading pruned models the Hugging Face way (``trust_remote_code``).

A pruned directory's ``config.json`` is the dense config, so transformers alone cannot build the model. It carries
the Hugging Face convention for such architectures instead: ``auto_map`` names :data:`CLASS_NAME` in a copy of
:data:`MODULE_FILE` for each of the family's Auto classes (``ModelAdapter.auto_classes``), and that module calls
:func:`load_from_auto_class`, i.e. ``comp_vlm.load_pruned``. A short model card (:data:`CARD_FILE`) says how to load
it. :func:`enable_save_pretrained` gives a pruned model a ``save_pretrained`` that writes such a directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

MODULE_FILE = "modeling_comp_vlm.py"
CLASS_NAME = "CompVLMPruned"
CARD_FILE = "README.md"
EXTRA_ATTR = "comp_vlm_recipe_extra"  # the provenance (Recipe.extra) save_pretrained writes again

#: from_pretrained arguments about fetching files or bookkeeping: a local directory needs none of them
FETCH_KWARGS = frozenset({
    "cache_dir", "force_download", "local_files_only", "proxies", "revision", "token", "code_revision",
    "_commit_hash", "trust_remote_code", "adapter_kwargs", "use_safetensors", "low_cpu_mem_usage", "_from_auto",
    "_from_pipeline", "resume_download",
})
#: save_pretrained arguments that do not apply: one safetensors file, always; nothing is pushed
SAVE_IGNORED_KWARGS = frozenset({"safe_serialization", "max_shard_size", "variant", "token", "save_function",
                                 "save_peft_format"})


def auto_map(auto_classes: tuple[str, ...]) -> dict[str, str]:
    """``config.json``'s ``auto_map``: each Auto class to :data:`CLASS_NAME` in :data:`MODULE_FILE`."""
    return {name: f"{Path(MODULE_FILE).stem}.{CLASS_NAME}" for name in auto_classes}


def without_auto_map(config: Any) -> Any:
    """``config`` (changed in place) without the ``auto_map`` a saved pruned directory's config carries."""
    if "auto_map" in getattr(config, "__dict__", {}):
        del config.auto_map
    return config


def write_remote_files(directory: Path, auto_classes: tuple[str, ...], recipe: Any, weights_file: str) -> None:
    """Copy :data:`MODULE_FILE` into ``directory`` and write the model card."""
    shutil.copyfile(Path(__file__).with_name(MODULE_FILE), directory / MODULE_FILE)
    (directory / CARD_FILE).write_text(model_card(auto_classes, recipe, weights_file))


def model_card(auto_classes: tuple[str, ...], recipe: Any, weights_file: str) -> str:
    """A short README.md: what the directory is and the ways to load it."""
    auto = "\n".join(f'model = {name}.from_pretrained("DIR", trust_remote_code=True)' for name in auto_classes)
    return f"""# A pruned {recipe.model_class} (comp-vlm)

Pruned with comp-vlm (CoMP) to {recipe.flops_kept:.1%} of the dense model's FLOPs at its reference input
({recipe.reference}). `config.json` is the dense model's config, the pruned structure is in `comp_recipe.json` and
the weights are in `{weights_file}`, so `{recipe.model_class}.from_pretrained` cannot load it (and must not: it
would fill the pruned tensors with random weights). Load it with comp-vlm installed:

```python
import comp_vlm
model = comp_vlm.load_pruned("DIR")

from transformers import {", ".join(auto_classes)}
{auto}
```

A transformers pipeline of those classes' tasks takes `model="DIR", trust_remote_code=True` (with the tokenizer and
image processor saved here). Either way the result is an ordinary `{recipe.model_class}` with the pruned shapes and
comp-vlm's token sites; its `save_pretrained` writes a directory like this one.
"""


def _shown(name: str, value: Any) -> str:
    text = repr(value)
    return f"{name}={text}" if len(text) <= 40 and "\n" not in text else f"{name} (a {type(value).__name__})"


def _refuse_unsupported(kwargs: dict[str, Any], ignored: frozenset[str], what: str, why: str) -> None:
    """Refuse, in one line, arguments outside ``ignored`` that ask for something (not None or False)."""
    asked = sorted(k for k, v in kwargs.items() if k not in ignored and v is not None and v is not False)
    if asked:
        raise ConfigError(f"{what} cannot honour {', '.join(_shown(k, kwargs[k]) for k in asked)}: {why}")


def _device(device_map: Any) -> torch.device:
    """The one device a ``device_map`` names (a device, its name or a GPU index); anything else is refused."""
    if device_map is None:
        return torch.device("cpu")
    try:
        if isinstance(device_map, (str, int, torch.device)) and device_map != "auto":
            return torch.device(device_map)
    except RuntimeError:
        pass
    raise ConfigError(f"a comp-vlm pruned model loads on one device: device_map={device_map!r} is not one "
                      "(give a device such as 'cpu' or 'cuda:0', or move the model after loading)")


def _dtype(dtype: Any) -> torch.dtype | None:
    """A torch dtype from a dtype or its name; None for None and "auto" (what load_pruned builds)."""
    if dtype is None or dtype == "auto":
        return None
    found = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(found, torch.dtype):
        raise ConfigError(f"dtype={dtype!r} is not a torch dtype")
    return found


def load_from_auto_class(path: str | os.PathLike, *model_args: Any, config: Any = None, **kwargs: Any) -> nn.Module:
    """What ``AutoModel.from_pretrained(path, trust_remote_code=True)`` (or another of the family's Auto classes,
    or a pipeline) returns for a pruned directory: ``comp_vlm.load_pruned(path)``. Honoured: ``dtype`` (or
    ``torch_dtype``; "auto" keeps load_pruned's), ``device_map`` naming one device, ``attn_implementation``,
    ``subfolder``. Ignored: the download arguments (:data:`FETCH_KWARGS`; the directory is local) and ``config``
    when it describes the saved architecture. Anything else (``device_map="auto"``, ``quantization_config``, extra
    positional arguments, another config) is a one-line :class:`ConfigError`."""
    from ..adapters.base import config_hash
    from ..io import load_pruned

    directory = Path(path) / (kwargs.pop("subfolder", None) or "")
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a local directory: comp-vlm loads pruned models from one (fetch a "
                              "Hub repository first, e.g. with huggingface_hub.snapshot_download)")
    if model_args:
        raise ConfigError(f"from_pretrained of a comp-vlm pruned model takes no positional model arguments, got "
                          f"{len(model_args)}")
    dtype, torch_dtype = kwargs.pop("dtype", None), kwargs.pop("torch_dtype", None)
    dtype = _dtype(torch_dtype if dtype is None else dtype)
    device = _device(kwargs.pop("device_map", None))
    # AutoConfig takes attn_implementation into the config it passes on
    attn = kwargs.pop("attn_implementation", None) or getattr(config, "_attn_implementation", None)
    _refuse_unsupported(kwargs, FETCH_KWARGS, "from_pretrained of a comp-vlm pruned model",
                        "comp_vlm.load_pruned loads the whole model, unquantised, on one device")
    model = load_pruned(directory, device=device, attn_implementation=attn)
    if config is not None and config_hash(without_auto_map(config)) != config_hash(model.config):
        raise ConfigError(f"the config given to from_pretrained is not {directory}/config.json: a pruned model's "
                          "architecture is fixed by its recipe")
    return model if dtype is None else model.to(dtype)


def _save_pretrained(self: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                     **kwargs: Any) -> None:
    """Save this pruned model with ``comp_vlm.save_pruned`` (complete or not at all; an earlier pruned output is
    replaced, any other non-empty directory refused), so ``load_pruned`` and ``AutoModel.from_pretrained(...,
    trust_remote_code=True)`` load it again. Like transformers', it saves the model alone (no tokenizer or
    processor); only the main process writes. Ignored: ``safe_serialization`` (always safetensors),
    ``max_shard_size`` (one file), ``variant``, ``token``, ``save_function``, ``save_peft_format``. Refused:
    ``push_to_hub=True``, ``state_dict`` and any other argument."""
    from ..adapters.base import get_adapter
    from ..io import save_pruned

    _refuse_unsupported(kwargs, SAVE_IGNORED_KWARGS, "save_pretrained of a comp-vlm pruned model",
                        "comp_vlm.save_pruned writes the model's own weights to a local directory (upload that "
                        "with huggingface_hub)")
    if not is_main_process:
        return
    recipe = get_adapter(self).recipe()
    recipe.extra = dict(getattr(self, EXTRA_ATTR, None) or {})
    save_pruned(self, save_directory, recipe=recipe)


def enable_save_pretrained(model: nn.Module, extra: dict | None = None) -> nn.Module:
    """Give ``model`` (a pruned model, sliced) an instance-level ``save_pretrained`` that writes a pruned directory
    (transformers' own would write the dense config beside pruned weights); ``extra``: the recipe provenance to
    write with it. The class is untouched; a deep copy carries the method, bound to the copy."""
    model.__dict__[EXTRA_ATTR] = dict(extra or {})
    model.save_pretrained = MethodType(_save_pretrained, model)
    return model
