"""Collection of CIM statistics during ordinary training forwards (method.md §2, "Accumulate the sufficient
statistic").

Per unit the collector keeps Σ_batches Σ_n ω_n X²_{n,i}: for heads X is the context entering the attention
output projection, for neurons the activation entering the MLP output projection (both after the unit's own soft
mask). The weights ω come from CIT token scores: a layer's attention uses that layer's scores, its MLP the next
layer's (the last layer's MLP its own, gathered to the tokens its MLP saw). The MLP input of one layer waits in a
one-layer transient buffer until the next layer's scores exist. Persistent memory: one float64 per channel.

Collection happens only while enabled, in train mode, with grad enabled, and not inside a backward pass (so
gradient-checkpoint recomputation does not count twice); never during validation (eval mode, no_grad).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import importance
from .tokens import TokenState

CAPTURE_FLAG = "comp_capture_input"
CAPTURED = "comp_captured_input"


def capture_input_hook(module: nn.Module, args: tuple) -> None:
    """Forward pre-hook: keep the input of a linear while its capture flag is set (read and cleared by the layer)."""
    if module.__dict__.get(CAPTURE_FLAG, False):
        module.__dict__[CAPTURED] = args[0]


def pop_captured(module: nn.Module) -> torch.Tensor | None:
    return module.__dict__.pop(CAPTURED, None)


def in_backward() -> bool:
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and current() != -1


@dataclass
class _Pending:
    layer: int
    x: torch.Tensor
    state: TokenState
    fallback_scores: torch.Tensor | None


class StatsCollector:
    """CIP statistics for every layer of every tower. ``weighting``: 'cip' | 'uniform-rms' | 'no-cip'."""

    def __init__(self, weighting: str = "cip") -> None:
        if weighting not in importance.WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}")
        self.weighting = weighting
        self.enabled = False
        self.head_stats: dict[tuple[str, int], torch.Tensor] = {}
        self.neuron_stats: dict[tuple[str, int], torch.Tensor] = {}
        self.batches = 0
        self._pending: dict[str, _Pending] = {}

    def reset(self) -> None:
        self.head_stats.clear()
        self.neuron_stats.clear()
        self._pending.clear()
        self.batches = 0

    def wants_probs(self, module: nn.Module) -> bool:
        """Whether the layer must compute attention probabilities. Deliberately blind to backward, so a
        gradient-checkpoint recomputation follows the same (eager) path as the forward it replays."""
        return self.enabled and module.training

    def active(self, module: nn.Module) -> bool:
        """Whether this forward is recorded: not during validation (eval), under no_grad, nor inside a backward."""
        return self.wants_probs(module) and torch.is_grad_enabled() and not in_backward()

    def _weights(self, scores: torch.Tensor | None, state: TokenState) -> torch.Tensor:
        return importance.token_weights(scores, state.valid, state.pooled_slot, self.weighting)

    def _add(self, table: dict, key: tuple[str, int], x: torch.Tensor, weights: torch.Tensor) -> None:
        stat = importance.channel_stat(x.detach(), weights)
        importance.check_finite(stat, f"{key[0]} layer {key[1]} {'head' if table is self.head_stats else 'neuron'} statistic")
        table[key] = stat if key not in table else table[key] + stat

    def on_attention(self, tower: str, layer: int, scores: torch.Tensor | None, state: TokenState,
                     head_input: torch.Tensor | None) -> None:
        """After layer ``layer``'s attention: scores (B, n) over the slots of ``state`` (None: no heads left)."""
        self._flush(tower, scores)
        if head_input is not None and scores is not None:
            self._add(self.head_stats, (tower, layer), head_input, self._weights(scores, state))

    def on_mlp(self, tower: str, layer: int, mlp_input: torch.Tensor | None, state: TokenState,
               fallback_scores: torch.Tensor | None) -> None:
        if mlp_input is not None:
            self._pending[tower] = _Pending(layer, mlp_input.detach(), state, fallback_scores)

    def end_tower(self, tower: str) -> None:
        """After the last layer: its MLP is weighted by its own scores, gathered to the tokens it saw."""
        self._flush(tower, None)

    def _flush(self, tower: str, scores: torch.Tensor | None) -> None:
        """Accumulate the buffered MLP input of the previous layer, weighted by ``scores`` over the same slots."""
        pending = self._pending.pop(tower, None)
        if pending is not None:
            use = scores if scores is not None else pending.fallback_scores
            self._add(self.neuron_stats, (tower, pending.layer), pending.x, self._weights(use, pending.state))

    def end_batch(self) -> None:
        self.batches += 1

    # ---- ranking -------------------------------------------------------------------------------------------------
    def head_scores(self, tower: str, layer: int, out_proj: nn.Linear, head_dim: int) -> torch.Tensor | None:
        stat = self.head_stats.get((tower, layer))
        return None if stat is None else importance.head_scores(out_proj.weight.detach(), stat, head_dim)

    def neuron_scores(self, tower: str, layer: int, fc_out: nn.Linear) -> torch.Tensor | None:
        stat = self.neuron_stats.get((tower, layer))
        return None if stat is None else importance.neuron_scores(fc_out.weight.detach(), stat)

    def all_reduce(self) -> None:
        """Sum the statistics over the processes of a ``torch.distributed`` group (no-op when not initialised);
        every process must have seen the same layers. The sufficient statistic is additive, so this is exact."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for table in (self.head_stats, self.neuron_stats):
            for key in sorted(table):
                dist.all_reduce(table[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"head/{t}/{i}": v for (t, i), v in self.head_stats.items()}
        out.update({f"neuron/{t}/{i}": v for (t, i), v in self.neuron_stats.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        for key, value in state.items():
            kind, tower, layer = key.split("/")
            (self.head_stats if kind == "head" else self.neuron_stats)[(tower, int(layer))] = value.clone()
