"""Where a benchmark record comes from: the commit of the checkout and the versions of the software that ran it.
Shared by every benchmark script that writes records; no part of any suite key."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """HEAD of the repository at ``root`` and whether tracked files under comp_vlm/ or benchmarks/ (results
    excluded: the suite writes them) differ from it; (None, None) outside git. ``COMP_VLM_COMMIT``, set by
    whoever copied the checkout to another machine, overrides both (dirty unknown): a copy's git metadata can be
    stale (seen on a lent GPU machine, which read an older HEAD)."""
    if os.environ.get("COMP_VLM_COMMIT"):
        return os.environ["COMP_VLM_COMMIT"], None

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no", "--", "comp_vlm", "benchmarks",
                      ":(exclude)benchmarks/results")
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return head, bool(changed.strip())


def versions(root: Path | None = None) -> dict[str, str | bool | None]:
    """The software a record was produced with: Python, torch, transformers, and the comp_vlm checkout's commit
    (and whether its code differs from it, as :func:`git_state`); ``root`` defaults to that checkout. Stored
    beside a record's identity, never in a suite key or run identity."""
    import platform

    import torch
    import transformers

    import comp_vlm

    commit, dirty = git_state(root or Path(comp_vlm.__file__).resolve().parents[1])
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "comp_vlm_commit": commit, "comp_vlm_dirty": dirty}
