"""Tolerances for comparisons that cross an install or an attention kernel, stated once (issue 19).

Bit-for-bit equality (``torch.equal``, ``atol=0``) stays for comparisons within one process and one kernel: the same
code on the same inputs must give the same bits. Numbers *recorded* elsewhere (a fixture written by an earlier commit,
under another transformers, torch, numpy or CPU) and numbers computed through *another kernel* (eager vs sdpa, or the
``comp_vlm`` attention built on sdpa) differ in the last bits of float32: reductions run in another order. Those
comparisons use the tolerances below, never ad-hoc ones.
"""

from __future__ import annotations

import torch
import transformers

# float32 tensors (embeddings, logits of the tiny models, |x| <= ~10) recorded under another install
RECORDED_TENSOR = {"rtol": 1e-4, "atol": 1e-5}
# scalars derived from recorded losses. A stage cost is a loss difference divided by the FLOPs removed (0.01-0.1), so
# a 1e-6 loss drift becomes up to ~1e-4 in a cost; measured drift 5.24 -> 5.25: the 5th digit.
RECORDED_SCALAR = {"rel": 1e-3, "abs": 1e-4}
# the same scalars recorded under this very install (same versions): only a refactor's reordering is allowed
SAME_INSTALL_SCALAR = {"rel": 1e-5, "abs": 1e-9}
# eager attention vs sdpa (or comp_vlm's sdpa-based attention) on the same weights; measured 1.2e-7 on the tiny CLIP
KERNEL_ATOL = 1e-5


def installed_versions() -> dict[str, str]:
    """The library versions a recorded number depends on (stored with records that tests compare against)."""
    return {"torch": torch.__version__, "transformers": transformers.__version__}


def scalar_tolerance(recorded_versions: dict[str, str] | None) -> dict[str, float]:
    """``pytest.approx`` keywords for scalars recorded under ``recorded_versions`` (None: unknown install)."""
    return SAME_INSTALL_SCALAR if recorded_versions == installed_versions() else RECORDED_SCALAR
