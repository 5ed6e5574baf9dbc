"""Search checkpoints of :func:`comp_vlm.search.prune` at stage boundaries: the pruner's state (with the random
token scorer's generator), the model, the optimizer, the RNGs and the training data's position, written with
:mod:`comp_vlm.checkpoint` (a checkpoint written before the search package was split reads back unchanged).

Every checkpoint records what the search runs on (:func:`run_identity`): the dense model's config hash and weights
hash, and the data (a Karpathy JSON's path and hash, or the synthetic world's settings). Resuming on another model
or other data is refused in one line naming both (:func:`check_resume`); a checkpoint written before these records
is resumed with a warning that it cannot be checked."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..adapters.base import config_hash
from ..errors import CheckpointError
from .config import NEUTRAL, PruneConfig
from .pruner import Pruner

log = logging.getLogger("comp_vlm")


# ---- what a search runs on ---------------------------------------------------------------------------------------
def weights_hash(model: nn.Module) -> str:
    """SHA-256 of the model's tensors: names (sorted), dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def file_hash(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def run_identity(model: nn.Module, data: dict | None = None, source: str | None = None) -> dict:
    """What a search runs on: the model (config and weights hashes; ``source`` names it in messages only) and the
    data ``data`` describes (a Karpathy directory's settings, with its JSON's hash; the synthetic world's
    settings; None when unknown, e.g. a library caller's own loaders)."""
    identity: dict = {"model": {"config": config_hash(model.config), "weights": weights_hash(model)}, "data": None}
    if source is not None:
        identity["model"]["source"] = str(source)
    if data is not None:
        identity["data"] = json.loads(json.dumps(data, default=str))
        if data.get("kind") == "karpathy":
            identity["data"]["sha256"] = file_hash(data["json"])
    return identity


def _differences(part: str, recorded: dict | None, current: dict | None) -> list[str]:
    """``part``'s entries that differ between the checkpoint's ``recorded`` and the ``current`` identity (none
    where either side does not know it); ``source`` only names the model."""
    if not isinstance(recorded, dict) or not isinstance(current, dict):
        return []
    keys = sorted(k for k in set(recorded) | set(current) if k != "source" and recorded.get(k) != current.get(k))
    if not keys:
        return []
    named = (f"{part} {recorded.get('source', '?')} in the checkpoint, {current.get('source', '?')} now: "
             if "source" in recorded or "source" in current else "")
    return [named + ", ".join(f"{part} {k} {recorded.get(k)} in the checkpoint, {current.get(k)} now" for k in keys)]


def check_resume(config: PruneConfig, identity: dict) -> dict:
    """Refuse to resume (``config.resume``) a search checkpoint written for another model or other data, before
    any work, in one line naming both; returns ``identity``."""
    ckpt = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if not (config.resume and ckpt is not None and checkpoint.has_checkpoint(ckpt)):
        return identity
    state = checkpoint.read_state(ckpt)
    recorded = state.get("identity")
    if not isinstance(recorded, dict):
        if not {"config", "pruner"} <= set(state):
            return identity  # not a whole checkpoint: loading it says so
        log.warning("search checkpoint %s records no model or data identity (written by an earlier comp-vlm): "
                    "resuming it without checking that it is of this model and data", ckpt)
        return identity
    diffs = [d for part in ("model", "data") for d in _differences(part, recorded.get(part), identity.get(part))]
    if diffs:
        raise CheckpointError(f"search checkpoint {ckpt} is of another run ({'; '.join(diffs)}): resume with the "
                              "model and data it was written for, or start over without resuming")
    return identity


# ---- checkpoints ------------------------------------------------------------------------------------------------
def save_search_checkpoint(path: Path, model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer,
                           train_data: Any, config: PruneConfig, identity: dict | None = None) -> None:
    """Write the search's state to ``path``, replacing the previous checkpoint there; ``identity``: what the
    search runs on (:func:`run_identity`)."""
    meta, tensors = pruner.state_dict()
    opt_meta, opt_tensors = checkpoint.optimizer_state(opt)
    rng_meta, rng_tensors = checkpoint.rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors.update({f"model/{k}": v for k, v in model.state_dict().items()})
    data_state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    state = {"config": config.fingerprint(), "pruner": meta, "optimizer": opt_meta, "rng": rng_meta, "data": data_state,
             "identity": identity}
    checkpoint.write_checkpoint(path, state, tensors)


def load_search_checkpoint(path: Path, model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer,
                           train_data: Any, config: PruneConfig) -> None:
    """Restore what :func:`save_search_checkpoint` wrote, if ``config`` has the same fingerprint."""
    state, tensors = checkpoint.read_checkpoint(path)
    written = NEUTRAL | state["config"]  # a field added since the checkpoint was written: at its neutral value
    if written != config.fingerprint():
        changed = sorted(k for k in config.fingerprint() if written.get(k) != config.fingerprint()[k])
        raise CheckpointError(f"checkpoint {path} was written with other arguments ({', '.join(changed)}); "
                              "resume with the same arguments")
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")})
    pruner.load_state_dict(state["pruner"], tensors)
    checkpoint.load_optimizer_state(opt, state["optimizer"], tensors)
    checkpoint.set_rng_state(state["rng"], tensors)
    if state["data"] is not None and hasattr(train_data, "load_state_dict"):
        train_data.load_state_dict(state["data"])
    elif state["data"] is None:
        log.warning("the training data has no state_dict(): the resumed run restarts its data order")


__all__ = ["check_resume", "load_search_checkpoint", "run_identity", "save_search_checkpoint"]
