"""Search checkpoints of :func:`comp_vlm.search.prune` at stage boundaries: the pruner's state, the model, the
optimizer, the RNGs and the training data's position, written with :mod:`comp_vlm.checkpoint` (a checkpoint
written before the search package was split reads back unchanged)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import checkpoint
from ..errors import CheckpointError
from .config import NEUTRAL, PruneConfig
from .pruner import Pruner

log = logging.getLogger("comp_vlm")


def save_search_checkpoint(path: Path, model: nn.Module, pruner: Pruner, opt: torch.optim.Optimizer,
                           train_data: Any, config: PruneConfig) -> None:
    """Write the search's state to ``path``, replacing the previous checkpoint there."""
    meta, tensors = pruner.state_dict()
    opt_meta, opt_tensors = checkpoint.optimizer_state(opt)
    rng_meta, rng_tensors = checkpoint.rng_state()
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    tensors.update({f"model/{k}": v for k, v in model.state_dict().items()})
    data_state = train_data.state_dict() if hasattr(train_data, "state_dict") else None
    state = {"config": config.fingerprint(), "pruner": meta, "optimizer": opt_meta, "rng": rng_meta, "data": data_state}
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


__all__ = ["load_search_checkpoint", "save_search_checkpoint"]
