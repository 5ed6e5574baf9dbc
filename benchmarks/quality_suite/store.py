"""Record storage of the quality suite: results files read and written atomically under a lock, and the claims by
which suite processes side by side split the runs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from comp_vlm.outputs import pid_alive

from .arms import LEGACY, label_of, suite_of


def done_runs(records: list[dict]) -> set[tuple[str, str, int]]:
    """The (suite, arm label, seed) of every recorded run: what a restart skips."""
    return {(suite_of(r), label_of(r), r["seed"]) for r in records}


def by_suite(items: list[dict]) -> dict[str, list[dict]]:
    """Records or stage records per suite key, in the order the suites first appear."""
    out: dict[str, list[dict]] = {}
    for item in items:
        out.setdefault(suite_of(item), []).append(item)
    return out


def load_records(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.is_file() else []


def load_stages(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``'s lock file: suite processes side by side never interleave their writes."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update_json(path: Path, change: Callable[[Any], Any], empty: Any) -> None:
    """Read ``path`` (``empty`` if absent), apply ``change``, write it back through a temp file and rename, under an
    exclusive lock: a crash never leaves a truncated results file, and suite processes running side by side (e.g.
    one per core) never lose each other's updates."""
    with locked(path):
        value = change(json.loads(path.read_text()) if path.is_file() else empty)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as fh:
            json.dump(value, fh, indent=1)
        os.replace(tmp, path)


@contextlib.contextmanager
def claimed(claims: Path, suite: str, arm: str, seed: int) -> Iterator[bool]:
    """Claim the run (suite, arm, seed) for this process while it runs: yields False when another live process
    holds it, so suite processes side by side (one per core, or per GPU share) split the work instead of repeating
    it. A claim is a file naming host and pid; one left by a dead process on this host is taken over, one from
    another host is respected (delete it by hand if that machine is gone)."""
    import socket

    claims.mkdir(parents=True, exist_ok=True)
    path = claims / f"{suite}-{arm}-{seed}"
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            host, _, pid = path.read_text().partition(" ") if path.is_file() else ("", "", "")
            if host != socket.gethostname() or not pid.strip().isdigit() or pid_alive(int(pid)):
                yield False
                return
            path.unlink(missing_ok=True)  # its process is gone: the run was never recorded
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me)
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def append_records(path: Path, new: list[dict]) -> None:
    update_json(path, lambda records: records + new, [])


def append_line(path: Path, value: Any) -> None:
    """Append ``value`` as one JSON line, under the lock (a long line may take several writes)."""
    with locked(path), path.open("a") as fh:
        fh.write(json.dumps(value) + "\n")


def merge_floors(recorded: dict, suite: str, floors: dict[str, float]) -> dict:
    """``recorded`` floors ({suite: {arm: floor}}) with ``floors`` added under ``suite``; a flat file of the
    legacy format ({arm: floor}) becomes the suite ``legacy``."""
    if recorded and not all(isinstance(v, dict) for v in recorded.values()):
        recorded = {LEGACY: recorded}
    return recorded | {suite: recorded.get(suite, {}) | floors}
