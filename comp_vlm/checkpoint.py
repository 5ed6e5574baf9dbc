"""Search checkpoints at stage boundaries: tensors in safetensors, everything else in JSON (no pickle), written
into a temporary directory and renamed into place (:func:`comp_vlm.outputs.staged`), so a crash never leaves a
half-written checkpoint, and a crash between the two renames of a replacement leaves the previous one, which
:func:`has_checkpoint` puts back."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import outputs
from .errors import CheckpointError, CompVLMError

TENSORS = "tensors.safetensors"
STATE = "state.json"
KIND = "checkpoint"


def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return meta, {"rng/torch": torch.get_rng_state()}


def set_rng_state(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch"])


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt/{idx}/{name}"] = value
            else:
                scalars[f"{idx}/{name}"] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def load_optimizer_state(opt: torch.optim.Optimizer, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split("/", 1)
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def write_checkpoint(directory: str | Path, state: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a checkpoint, replacing an earlier one (never a directory comp-vlm did not write)."""
    from safetensors.torch import save_file

    target = Path(directory)
    text = json.dumps(state)
    needed = safetensors_bytes(tensors) + len(text.encode())
    # a full disk: one line naming the checkpoint and its size; the previous checkpoint stays
    with outputs.writing(target, needed), outputs.staged(target, KIND, overwrite=True, what="checkpoint directory",
                                                         replace_kinds=(KIND,)) as tmp:
        save_file(unshared(tensors), str(tmp / TENSORS))
        (tmp / STATE).write_text(text)
    return target


def unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` on the CPU, contiguous, a tensor sharing storage with an earlier one (tied weights: BLIP's LM head
    and word embeddings) copied, since safetensors refuses shared tensors; loading fills both names again."""
    out, seen = {}, set()
    for key, value in tensors.items():
        tensor = value.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """About the size of the safetensors file of ``tensors`` (within a few bytes): their bytes and the JSON header
    describing them."""
    header, offset = {}, 0
    for name, t in sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):  # safetensors' order
        size = t.numel() * t.element_size()
        dtype = _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype))
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    head = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + head + (-head % 8) + offset


def has_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint, after putting back one that a writer killed in the middle of
    replacing it had moved aside (``.NAME.old-*``)."""
    path = Path(directory)
    outputs.recover(path)
    return (path / STATE).is_file() and (path / TENSORS).is_file()


@contextmanager
def reading(directory: str | Path) -> Iterator[None]:
    """Turn what a checkpoint with missing or mistyped entries raises while it is applied into a
    :class:`CheckpointError` naming it."""
    try:
        yield
    except CompVLMError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as exc:
        raise CheckpointError(f"search checkpoint {directory} is incomplete or corrupt ({type(exc).__name__}: "
                              f"{exc}); start over without resuming") from None


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"search checkpoint {path} is corrupt: {exc}")


def read_state(directory: str | Path) -> dict:
    """The JSON part of a checkpoint (without reading its tensors)."""
    path = Path(directory)
    if not (path / STATE).is_file() or not (path / TENSORS).is_file():
        raise CheckpointError(f"{path} holds no search checkpoint ({STATE} + {TENSORS})")
    try:
        state = json.loads((path / STATE).read_text())
    except (json.JSONDecodeError, OSError) as exc:
        raise _corrupt(path, exc) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"search checkpoint {path} is incomplete or corrupt ({STATE} holds no JSON object); "
                              "start over without resuming")
    return state


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(directory)
    state = read_state(path)
    try:
        tensors = load_file(str(path / TENSORS))
    except (SafetensorError, OSError) as exc:
        raise _corrupt(path, exc) from None
    return state, tensors
