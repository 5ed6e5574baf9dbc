"""Collection of CIM statistics during ordinary training forwards (method.md §2, "Accumulate the sufficient
statistic").

Per unit group (kind, tower, layer) the collector keeps Σ_batches Σ_n ω_n X²_{n,i}: for heads X is the context entering the attention
output projection, for neurons the activation entering the MLP output projection (both after the unit's own soft
mask). The weights ω come from CIT token scores: a layer's attention uses that layer's scores, its MLP the next
layer's (the last layer's MLP its own, gathered to the tokens its MLP saw). The MLP input of one layer waits in a
one-layer transient buffer until the next layer's scores exist. Persistent memory: one float64 per channel.

The anchor (ω_0 = 1) is the tower's pooled token; a tower with no pooled token (SigLIP's vision tower,
``TokenState.start(pooled_token=False)``) has none, and every token is weighted by its score.

Reduced tokens (``token_reducer``): a fused token is never prunable, so the sites' scores give it 0 and ``cip``
weights it ω = 0, as any always-kept token other than the anchor (``uniform-rms``: 1/N, ``no-cip``: 1, like any
other token). A merged token is weighted by its own score: under proportional attention the attention it receives
counts the tokens it holds, so its ω grows with its size without a further factor.

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
        self.stats: dict[tuple[str, str, int], torch.Tensor] = {}  # (kind, tower, layer) -> per-channel statistic
        self.batches = 0
        self._pending: dict[str, _Pending] = {}

    def reset(self) -> None:
        self.stats.clear()
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
        return importance.token_weights(scores, state.valid, state.anchor_slot, self.weighting)

    def _add(self, key: tuple[str, str, int], x: torch.Tensor, weights: torch.Tensor) -> None:
        stat = importance.channel_stat(x.detach(), weights)
        kind, tower, layer = key
        importance.check_finite(stat, f"{tower} layer {layer} {kind} statistic")
        self.stats[key] = stat if key not in self.stats else self.stats[key] + stat

    def on_attention(self, tower: str, layer: int, scores: torch.Tensor | None, state: TokenState,
                     head_input: torch.Tensor | None, kind: str = "head") -> None:
        """After layer ``layer``'s attention: scores (B, n) over the slots of ``state`` (None: no heads left);
        ``head_input`` is the input of the attention's output projection, the statistic of its ``kind`` units."""
        self._flush(tower, scores)
        if head_input is not None and scores is not None:
            self._add((kind, tower, layer), head_input, self._weights(scores, state))

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
            self._add(("neuron", tower, pending.layer), pending.x, self._weights(use, pending.state))

    def end_batch(self) -> None:
        self.batches += 1

    # ---- ranking -------------------------------------------------------------------------------------------------
    def unit_scores(self, key: tuple[str, str, int], out_weight: torch.Tensor, width: int) -> torch.Tensor | None:
        """Scores of a unit group's units from its statistic and the weight of the linear whose input it measures
        (units of ``width`` input columns each); None before the group has a statistic."""
        stat = self.stats.get(key)
        return None if stat is None else importance.unit_scores(out_weight.detach(), stat, width)

    def all_reduce(self) -> None:
        """Sum the statistics over the processes of a ``torch.distributed`` group (no-op when not initialised);
        every process must have seen the same layers. The sufficient statistic is additive, so this is exact."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        for key in sorted(self.stats):
            dist.all_reduce(self.stats[key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{kind}/{t}/{i}": v for (kind, t, i), v in self.stats.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.reset()
        for key, value in state.items():
            kind, tower, layer = key.split("/")
            self.stats[(kind, tower, int(layer))] = value.clone()
