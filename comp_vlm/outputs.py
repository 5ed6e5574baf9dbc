"""Output directories: written complete or not at all, and never over files comp-vlm did not write.

Every directory comp-vlm writes (a pruned model, a ``comp-vlm prune`` run, the demo's output, a search checkpoint)
holds a marker file, :data:`MARKER`, naming its kind and the entries comp-vlm put there. Only a directory with a
marker, and no entries beyond those it lists, is ever replaced; a non-empty directory without one is refused
whatever ``overwrite`` says.

:func:`staged` writes a directory in a hidden sibling ``.NAME.tmp-PID-XXXX`` and renames it into place once. An
earlier output it replaces is first renamed to ``.NAME.old-PID-XXXX`` and deleted after the swap. Leftovers of a
killed writer are tidied the next time anything is written to (or :func:`recover` is called on) the same path: a
temporary directory is deleted, and an earlier output that was moved aside is put back where the swap left none.

``COMP_VLM_FAULT=NAME`` (or ``NAME:N``, the N-th time) makes the writer SIGKILL its own process at the named
step, for tests: ``KIND:commit`` (everything written, nothing renamed yet) and ``KIND:swap`` (the earlier output
moved aside, the new one not yet in place), with KIND one of ``pruned``, ``prune-run``, ``demo``, ``checkpoint``.

A full disk while writing is one :class:`NoSpaceError` naming the file and the bytes it needs (:func:`writing`);
the unfinished temporary directory is deleted, so an earlier output (or search checkpoint) stays as it was.
:func:`run_lock` keeps two runs from writing the same output at once.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

MARKER = ".comp-vlm-output.json"
FAULT_ENV = "COMP_VLM_FAULT"
_fault_hits: dict[str, int] = {}


# ---- fault points (tests) -------------------------------------------------------------------------------------
def fault_point(name: str) -> None:
    """SIGKILL this process if ``COMP_VLM_FAULT`` names this step (``NAME`` or ``NAME:N`` for the N-th hit)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "1")
    if target != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- markers --------------------------------------------------------------------------------------------------
def read_marker(directory: Path) -> dict | None:
    """The marker of a comp-vlm output directory, or None if it has none (or an unreadable one)."""
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and isinstance(marker.get("kind"), str) else None


def write_marker(directory: Path, kind: str, complete: bool) -> None:
    """Mark ``directory`` as a comp-vlm output of ``kind``; a complete one lists the entries it holds."""
    files = sorted(p.name for p in directory.iterdir() if p.name != MARKER) if complete else None
    (directory / MARKER).write_text(json.dumps({"comp_vlm": 1, "kind": kind, "complete": complete,
                                                "pid": os.getpid(), "files": files}))


def is_output(directory: str | os.PathLike, kind: str | None = None) -> bool:
    """Whether ``directory`` holds a comp-vlm output (of ``kind``, if given)."""
    marker = read_marker(Path(directory)) if Path(directory).is_dir() else None
    return marker is not None and (kind is None or marker["kind"] == kind)


# ---- checks ---------------------------------------------------------------------------------------------------
def _within(path: Path, other: Path) -> bool:
    """``path`` is ``other`` or one of its parents."""
    return path == other or path in other.parents


def _foreign_entries(directory: Path, marker: dict | None) -> list[str]:
    """Entries of ``directory`` that comp-vlm did not write (all of them without a marker)."""
    names = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    if marker is None:
        return names
    if marker.get("files") is None:  # an interrupted output: everything in it is comp-vlm's
        return []
    return [n for n in names if n not in set(marker["files"])]


def check_writable(directory: Path, what: str) -> None:
    """Refuse unless a directory can be created in ``directory``'s nearest existing ancestor (a real probe: a
    mode check says nothing on read-only file systems or for root)."""
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what}: {probe} is not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".comp-vlm-probe-", dir=probe))
    except OSError as exc:
        raise OutputError(f"{what}: cannot write in {probe} ({exc.strerror or exc})") from None


# ---- a full disk ----------------------------------------------------------------------------------------------
class NoSpaceError(OutputError):
    """The file system filled up while comp-vlm wrote ``path``, which needs ``needed`` bytes (at least, when
    ``exact`` is false)."""

    def __init__(self, path: Path, needed: int, exact: bool = True) -> None:
        self.path, self.needed, self.exact = Path(path), int(needed), exact
        amount = f"{self.needed:,} bytes" if exact else f"more than {self.needed:,} bytes"
        super().__init__(errno.ENOSPC, f"no space left on device for {self.path}: it needs {amount}, and "
                                       f"{free_bytes(self.path):,} bytes are free there; free some space and run "
                                       "again (nothing was replaced)")

    def __str__(self) -> str:
        return self.strerror

    def moved(self, tmp: Path, target: Path) -> NoSpaceError:
        """The same error for the file's place in ``target``, when it was written in the temporary ``tmp``."""
        path = target / self.path.relative_to(tmp) if tmp == self.path or tmp in self.path.parents else self.path
        return NoSpaceError(path, self.needed, self.exact)


def free_bytes(path: Path) -> int:
    """Free bytes on the file system of ``path`` (of its nearest existing ancestor)."""
    probe = Path(os.path.abspath(path))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` reports a full disk or an exhausted quota (an ``OSError``, or safetensors' error)."""
    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, OSError):
        return exc.errno in codes
    return type(exc).__name__ == "SafetensorError" and any(f"(os error {c})" in str(exc) for c in codes)


def tree_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory``."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file() and not f.is_symlink())


@contextmanager
def writing(path: str | os.PathLike, needed: int) -> Iterator[None]:
    """Around the writes of ``needed`` bytes to ``path``: a full disk becomes one :class:`NoSpaceError`."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise NoSpaceError(Path(path), needed) from None


def check_target(path: str | os.PathLike, *, overwrite: bool, what: str = "output directory",
                 protected: Sequence[str | os.PathLike] = (), replace_kinds: Sequence[str] | None = None,
                 hint: str = "overwrite=True") -> None:
    """Refuse a target comp-vlm must not write: the current directory, a ``protected`` one (e.g. the model
    directory) or a parent of either; a file or symlink; a non-empty directory that is not a comp-vlm output of
    ``replace_kinds`` (any kind when None) or holds entries comp-vlm did not write; an earlier output without
    ``overwrite``; a place that cannot be written."""
    target = Path(path)
    label = f"{what} {target}"
    resolved = target.resolve()
    if _within(resolved, Path.cwd().resolve()):
        raise OutputError(f"{label} is the current directory or a parent of it: choose a new directory")
    for other in protected:
        if _within(resolved, Path(other).resolve()):
            raise OutputError(f"{label} is {other} or a parent of it: choose a new directory")
    if target.is_symlink():
        raise OutputError(f"{label} is a symbolic link: give the directory itself")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{label} exists and is not a directory")
    if target.is_dir() and any(target.iterdir()):
        marker = read_marker(target)
        foreign = _foreign_entries(target, marker)
        if marker is None:
            raise OutputError(f"{label} is not empty and was not written by comp-vlm (it holds no {MARKER}; "
                              "outputs of versions before these markers count too: remove them yourself): comp-vlm "
                              "never replaces files it did not write; choose a new or empty directory")
        if replace_kinds is not None and marker["kind"] not in replace_kinds:
            raise OutputError(f"{label} holds a comp-vlm {marker['kind']} output, which this command does not "
                              "replace: choose another directory")
        if foreign:
            raise OutputError(f"{label} holds files comp-vlm did not write ({', '.join(foreign[:3])}): choose a new "
                              "directory or move them away")
        if not overwrite:
            raise OutputError(f"{label} holds an earlier comp-vlm output ({marker['kind']}): pass {hint} to "
                              "replace it")
    check_writable(target.parent, label)


# ---- leftovers ------------------------------------------------------------------------------------------------
def pid_alive(pid: object) -> bool:
    """Whether a process with this pid runs on this host (a permission error means it does)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(target: Path, tag: str) -> list[tuple[Path, dict]]:
    """``.NAME.tag-*`` siblings of ``target`` left by a writer that is gone, with their markers."""
    if not target.parent.is_dir():
        return []
    found = []
    for p in sorted(target.parent.glob(f".{target.name}.{tag}-*")):
        marker = read_marker(p) if p.is_dir() and not p.is_symlink() else None
        if marker is not None and not pid_alive(marker.get("pid")):
            found.append((p, marker))
    return found


def recover(path: str | os.PathLike) -> list[str]:
    """Tidy what a killed writer left next to ``path``: delete its temporary directories, and put back an earlier
    output it had moved aside when nothing took its place (delete it otherwise). Returns what was done."""
    target = Path(path)
    done = []
    for tmp, _ in _leftovers(target, "tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
        done.append(f"removed the unfinished {tmp.name}")
    for old, _ in _leftovers(target, "old"):
        if not target.exists():
            old.rename(target)
            done.append(f"restored {target.name} from {old.name}")
        else:
            shutil.rmtree(old, ignore_errors=True)
            done.append(f"removed the replaced {old.name}")
    return done


def leftovers_note(path: str | os.PathLike) -> str:
    """For an error about a missing ``path``: where a killed writer left the earlier output it had moved aside."""
    found = [p.name for p, _ in _leftovers(Path(path), "old")]
    return (f" (an interrupted comp-vlm run moved the earlier output to {Path(path).parent / found[0]}; writing "
            f"to {path} again puts it back)") if found else ""


# ---- writing --------------------------------------------------------------------------------------------------
def ordinary_mode(directory: bool) -> int:
    """The mode a new directory (0777) or file (0666) gets under the user's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def apply_umask(tree: Path) -> None:
    """Give ``tree`` and everything in it the modes ordinary files get under the user's umask (temporary
    directories and files are created 0700/0600)."""
    os.chmod(tree, ordinary_mode(True))
    for root, dirs, files in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), ordinary_mode(True))
        for f in files:
            os.chmod(os.path.join(root, f), ordinary_mode(False))


def _swap_in(tmp: Path, target: Path, kind: str) -> None:
    """Rename the finished ``tmp`` to ``target``. An empty directory there is replaced in the same rename; an
    earlier output is moved aside first (owned by this process while it lies there) and deleted after."""
    if not target.exists() or not any(target.iterdir()):
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    target.rename(old)
    marker = read_marker(old) or {"kind": kind}
    (old / MARKER).write_text(json.dumps({**marker, "pid": os.getpid()}))
    fault_point(f"{kind}:swap")
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged(path: str | os.PathLike, kind: str, *, overwrite: bool = False, what: str = "output directory",
           protected: Sequence[str | os.PathLike] = (), replace_kinds: Sequence[str] | None = None,
           hint: str = "overwrite=True") -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without error, mark it complete and rename it to
    ``path`` (replacing an earlier output, see :func:`check_target`); on error, delete it."""
    target = Path(path)
    recover(target)
    check_target(target, overwrite=overwrite, what=what, protected=protected, replace_kinds=replace_kinds,
                 hint=hint)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        write_marker(tmp, kind, complete=False)
        yield tmp
        write_marker(tmp, kind, complete=True)
        apply_umask(tmp)
        fault_point(f"{kind}:commit")
        check_target(target, overwrite=overwrite, what=what, protected=protected, replace_kinds=replace_kinds,
                     hint=hint)  # again: the block may have run for hours
        _swap_in(tmp, target, kind)
    except BaseException as exc:
        written = tree_bytes(tmp) if tmp.is_dir() and is_disk_full(exc) else 0
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, NoSpaceError):
            raise exc.moved(tmp, target) from None
        if is_disk_full(exc):  # a write without a known size: the output needs more than it had written
            raise NoSpaceError(target, written, exact=False) from None
        raise


def remove(path: str | os.PathLike, kind: str) -> bool:
    """Delete ``path`` if it is a comp-vlm output of ``kind`` (and nothing else); returns whether it did."""
    target = Path(path)
    marker = read_marker(target) if target.is_dir() and not target.is_symlink() else None
    if marker is None or marker["kind"] != kind or _foreign_entries(target, marker):
        return False
    shutil.rmtree(target)
    return True


def claim_in_place(path: str | os.PathLike, kind: str, *, what: str = "output directory") -> Path:
    """For a writer that fills its directory step by step (the demo): refuse a target :func:`check_target`
    refuses, delete an earlier output of the same ``kind``, and create the directory marked incomplete. Call
    :func:`mark_complete` at the end."""
    target = Path(path)
    recover(target)
    check_target(target, overwrite=True, what=what, replace_kinds=(kind,))
    if target.is_dir() and any(target.iterdir()):
        shutil.rmtree(target)
    target.mkdir(parents=True, exist_ok=True)
    write_marker(target, kind, complete=False)
    return target


def mark_complete(path: str | os.PathLike, kind: str) -> None:
    """Mark a directory filled by :func:`claim_in_place` as complete."""
    write_marker(Path(path), kind, complete=True)


# ---- one run per output ---------------------------------------------------------------------------------------
LOCK_SUFFIX = ".lock"


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the output ``path``: ``PATH.lock`` next to it."""
    target = Path(os.path.abspath(path))
    return target.with_name(target.name + LOCK_SUFFIX)


def _read_lock(path: Path) -> dict:
    """What a lock file says (an empty dict when it is unreadable, e.g. still being written)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict) -> str:
    return (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, since {record.get('started', '?')}"
            if record else "a process that is still writing the lock")


def _is_stale(record: dict) -> bool:
    """A lock taken on this host by a process that is gone."""
    return bool(record) and record.get("host") == socket.gethostname() and not pid_alive(record.get("pid"))


def _take_over(path: Path, stale: dict) -> bool:
    """Remove the stale lock ``stale`` (only that one: it is renamed aside first and checked); whether it did."""
    aside = path.with_name(f".{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return True  # someone else removed it: try again
    moved = _read_lock(aside)
    if moved != stale:  # another run took it over in between: put its lock back
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)
    return moved == stale


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing parents; returns those it created, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _acquire(lock: Path, record: dict, what: str, path: str | os.PathLike) -> bool:
    """Create ``lock`` holding ``record``, taking over a stale one; False where no file can be made there."""
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ordinary_mode(False))
        except FileExistsError:
            held = _read_lock(lock)
            if _is_stale(held) and _take_over(lock, held):
                continue
            raise OutputError(f"{what} {path} is being written by another comp-vlm run ({_holder(held)}; lock "
                              f"{lock}): wait for it to end, or remove {lock.name} if that run is gone") from None
        except OSError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    raise OutputError(f"{what} {path}: cannot take its lock {lock}, which other runs keep changing")


@contextmanager
def run_lock(path: str | os.PathLike, what: str = "--out") -> Iterator[Path | None]:
    """Hold ``PATH.lock`` (created atomically, holding pid, host and start time) while a run writes ``path``;
    another run is refused at once, naming the holder. A lock whose process is gone from this host is taken over;
    one from another host is never judged stale. Yields None (no lock) where no file can be made next to
    ``path``: the run's own checks refuse such an output. Under torchrun, rank 0 alone takes it (one call site)."""
    lock = lock_path(path)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": secrets.token_hex(8)}
    try:
        made = _make_parents(lock.parent)
    except OSError:
        made = None
    held = made is not None and _acquire(lock, record, what, path)
    try:
        yield lock if held else None
    finally:
        if held and _read_lock(lock) == record:
            lock.unlink(missing_ok=True)
        for d in made or ():
            try:
                d.rmdir()  # the parents it made, while still empty (the run was refused)
            except OSError:
                break
