"""Reporting: progress lines on stderr (quiet with ``-q``), result lines on stdout, the dense-vs-pruned table, the
plot, and strict JSON and JSONL files (a non-finite number is written ``null``)."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .jsontext import json_text, strict  # noqa: F401 (re-exported: the CLI's and demo's JSON)

log = logging.getLogger("comp_vlm")


_progress_lines = {"on": True}


def say(message: str) -> None:
    """One readable progress line on stderr, beside the progress bars (through tqdm, so they stay intact); none
    when quiet."""
    if _progress_lines["on"]:
        tqdm.write(message, file=sys.stderr)


def show(message: str) -> None:
    """One result line on stdout that ``-q`` leaves out (a quiet run prints a summary instead)."""
    if _progress_lines["on"]:
        result(message)


def result(message: str) -> None:
    """One result line on stdout, printed with ``-q`` too."""
    tqdm.write(message, file=sys.stdout)


def set_progress_lines(on: bool) -> bool:
    """Turn :func:`say`'s lines on or off (``-q``); returns the previous setting."""
    previous, _progress_lines["on"] = _progress_lines["on"], on
    return previous


@dataclass
class Row:
    name: str
    metrics: dict | None
    flops: int
    params: int
    latency_ms: float | None
    extra: dict = field(default_factory=dict)


def format_table(rows: list[Row], dense_flops: int, dense_latency: float | None, metric_keys: tuple[str, ...]) -> str:
    heads = {"r1_mean": "R@1 mean", "i2t_r1": "i2t R@1", "t2i_r1": "t2i R@1"}
    width = max(len(r.name) for r in rows) + 2
    cols = [f"{heads.get(k, k):>9s}" for k in metric_keys]
    header = (f"{'model':<{width}s}" + "".join(cols) + f"{'GFLOPs':>10s}{'kept':>8s}{'params':>11s}"
              f"{'latency ms':>12s}{'speed-up':>10s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        m = "".join(f"{r.metrics[k]:9.1f}" if r.metrics and k in r.metrics else f"{'-':>9s}" for k in metric_keys)
        lat = f"{r.latency_ms:12.2f}" if r.latency_ms is not None else f"{'-':>12s}"
        sp = (f"{dense_latency / r.latency_ms:9.2f}x" if r.latency_ms and dense_latency else f"{'-':>10s}")
        lines.append(f"{r.name:<{width}s}{m}{r.flops / 1e9:10.4f}{r.flops / dense_flops:8.1%}{r.params:11,d}{lat}{sp}")
    return "\n".join(lines)


def write_plot(path: Path, stage_log: list[dict], points: list[tuple[str, float, float, str]], metric_name: str,
               dense_val_metric: float | None = None) -> Path | None:
    """Left: metric vs FLOPs kept (the search trajectory on the validation batches, and the evaluated models on
    the test split). Right: the mode MPS chose at every stage, with the FLOPs kept after it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'comp-vlm[plot]')")
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = [r["flops_kept"] for r in stage_log if r.get("metric") is not None]
    ys = [r["metric"] for r in stage_log if r.get("metric") is not None]
    if xs:
        if dense_val_metric is not None:
            xs, ys = [1.0] + xs, [dense_val_metric] + ys
        ax.plot(xs, ys, "-", color="0.6", marker=".", label="search trajectory (val, before fine-tuning)")
    markers = {"dense": "s", "control": "D", "pruned": "o"}
    for label, kept, value, kind in points:
        ax.scatter([kept], [value], marker=markers.get(kind, "o"), s=60, zorder=3, label=label)
    ax.set_xlabel("FLOPs kept (fraction of dense)")
    ax.set_ylabel(metric_name)
    ax.set_xlim(1.05, 0.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    ax.set_title("quality vs compute")
    modes = sorted({r["mode"] for r in stage_log})
    if stage_log:
        stages = [r["stage"] for r in stage_log]
        idx = [modes.index(r["mode"]) for r in stage_log]
        colours = plt.cm.tab10(range(len(modes)))
        bx.scatter(stages, idx, c=[colours[i] for i in idx], s=70, zorder=3)
        bx.set_yticks(range(len(modes)), modes)
        bx.set_xlabel("stage")
        bx.set_ylabel("mode chosen by MPS")
        twin = bx.twinx()
        twin.plot(stages, [r["flops_kept"] for r in stage_log], "-", color="0.5", label="FLOPs kept")
        twin.set_ylabel("FLOPs kept after the stage")
        twin.set_ylim(0, 1.05)
        bx.grid(alpha=0.3)
        bx.set_title("multi-mode schedule (MPS)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for r in records:
            fh.write(json_text(r) + "\n")
    return path


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` to ``path`` through a temporary file and one rename (complete or absent)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json_text(data, indent=1))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
