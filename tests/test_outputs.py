"""Output directories: never over files comp-vlm did not write, complete or absent, ordinary modes, leftovers of
a killed writer tidied, and search checkpoints that survive a kill between their two renames."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_clip
from test_io import pruned_model

import comp_vlm
from comp_vlm import OutputError, load_pruned, save_pruned
from comp_vlm import checkpoint as ckpt_io
from comp_vlm.io import WEIGHTS_FILE
from comp_vlm.outputs import MARKER, read_marker, write_marker


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


# ---- never over foreign files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("overwrite", [True, False])
def test_save_pruned_never_replaces_a_foreign_directory(tmp_path, overwrite):
    target = tmp_path / "x"
    (target / "sub").mkdir(parents=True)
    (target / "precious.txt").write_text("keep")
    with pytest.raises(OutputError, match="not written by comp-vlm"):
        save_pruned(pruned_model(), target, overwrite=overwrite)
    assert (target / "precious.txt").read_text() == "keep" and (target / "sub").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temporary directory left


def test_save_pruned_replaces_its_own_output_only_when_asked_and_untouched(tmp_path):
    target = save_pruned(pruned_model(0), tmp_path / "m")
    with pytest.raises(OutputError, match="overwrite=True"):
        save_pruned(pruned_model(1), target, overwrite=False)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        save_pruned(pruned_model(1), target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    (target / "notes.txt").unlink()
    save_pruned(pruned_model(1), target, overwrite=True)
    assert read_marker(target)["complete"] is True


def test_save_pruned_into_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    save_pruned(pruned_model(), tmp_path / "empty", overwrite=False)
    assert load_pruned(tmp_path / "empty") is not None


@pytest.mark.parametrize("where", [".", "..", "work"])
def test_save_pruned_refuses_the_current_directory_and_its_parents(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    target = {".": ".", "..": "..", "work": str(work)}[where]
    with pytest.raises(OutputError, match="current directory"):
        save_pruned(pruned_model(), target)
    assert list(work.iterdir()) == []


def test_save_pruned_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("data")
    with pytest.raises(OutputError, match="not a directory"):
        save_pruned(pruned_model(), tmp_path / "f")
    with pytest.raises(OutputError, match="not a directory"):
        save_pruned(pruned_model(), tmp_path / "f" / "m")
    assert (tmp_path / "f").read_text() == "data"


def test_checkpoint_writer_never_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep")
    with pytest.raises(OutputError):
        ckpt_io.write_checkpoint(tmp_path / "c", {"a": 1}, {"t": torch.zeros(2)})
    assert (tmp_path / "c" / "precious.txt").read_text() == "keep"


def test_an_output_of_another_kind_is_not_replaced(tmp_path):
    model_dir = save_pruned(pruned_model(), tmp_path / "m")
    with pytest.raises(OutputError, match="pruned output"):
        ckpt_io.write_checkpoint(model_dir, {"a": 1}, {"t": torch.zeros(2)})
    ck = ckpt_io.write_checkpoint(tmp_path / "c", {"a": 1}, {"t": torch.zeros(2)})
    with pytest.raises(OutputError, match="checkpoint output"):
        save_pruned(pruned_model(), ck, overwrite=True)
    assert load_pruned(model_dir) is not None and ckpt_io.has_checkpoint(ck)


# ---- modes ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mask", "dir_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_saved_directories_and_weights_follow_the_umask(tmp_path, umask, mask, dir_mode, file_mode):
    from comp_vlm.dense import save_cached_weights

    umask(mask)
    out = save_pruned(pruned_model(), tmp_path / "m")
    assert out.stat().st_mode & 0o777 == dir_mode
    assert (out / WEIGHTS_FILE).stat().st_mode & 0o777 == file_mode
    ck = ckpt_io.write_checkpoint(tmp_path / "c", {"a": 1}, {"t": torch.zeros(2)})
    assert ck.stat().st_mode & 0o777 == dir_mode
    assert (ck / ckpt_io.TENSORS).stat().st_mode & 0o777 == file_mode
    cache = tmp_path / "cache" / "dense.safetensors"
    save_cached_weights(cache, make_clip(0), {})
    assert cache.stat().st_mode & 0o777 == file_mode


# ---- leftovers of a killed writer -----------------------------------------------------------------------------
def test_leftover_temporary_directory_of_a_dead_writer_is_removed(tmp_path):
    pid = dead_pid()
    tmp = tmp_path / f".m.tmp-{pid}-abcd"
    tmp.mkdir()
    (tmp / WEIGHTS_FILE).write_bytes(b"half")
    (tmp / MARKER).write_text(json.dumps({"kind": "pruned", "complete": False, "pid": pid, "files": None}))
    foreign = tmp_path / ".m.tmp-user"  # the same pattern without a marker is not comp-vlm's
    foreign.mkdir()
    save_pruned(pruned_model(), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp-user", "m"]


def test_output_moved_aside_by_a_dead_writer_is_put_back(tmp_path):
    first = save_pruned(pruned_model(0), tmp_path / "m")
    aside = tmp_path / f".m.old-{dead_pid()}-abcd"
    first.rename(aside)
    marker = read_marker(aside)
    (aside / MARKER).write_text(json.dumps({**marker, "pid": dead_pid()}))
    with pytest.raises(OutputError, match="earlier comp-vlm output"):  # put back, so it needs overwrite=True
        save_pruned(pruned_model(1), tmp_path / "m", overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert load_pruned(tmp_path / "m") is not None


def test_checkpoint_moved_aside_by_a_dead_writer_is_found(tmp_path):
    ck = ckpt_io.write_checkpoint(tmp_path / "c", {"step": 3}, {"t": torch.ones(2)})
    aside = tmp_path / f".c.old-{dead_pid()}-abcd"
    ck.rename(aside)
    (aside / MARKER).write_text(json.dumps({**read_marker(aside), "pid": dead_pid()}))
    assert ckpt_io.has_checkpoint(tmp_path / "c")
    state, tensors = ckpt_io.read_checkpoint(tmp_path / "c")
    assert state == {"step": 3} and torch.equal(tensors["t"], torch.ones(2))


def test_marker_lists_what_the_output_holds(tmp_path):
    out = save_pruned(pruned_model(), tmp_path / "m")
    marker = read_marker(out)
    assert marker["kind"] == "pruned" and marker["complete"] is True
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    write_marker(out, "pruned", complete=True)  # idempotent
    assert read_marker(out)["files"] == marker["files"]


# ---- a corrupt checkpoint -------------------------------------------------------------------------------------
@pytest.mark.parametrize("state", [{}, {"config": None}, []])
def test_resume_from_a_checkpoint_with_a_broken_state_is_a_checkpoint_error(tmp_path, state):
    from test_engine import quick

    from comp_vlm.data.synthetic import SyntheticWorld, make_retrieval_loaders
    from comp_vlm.data.text import build_word_tokenizer
    from comp_vlm.tasks.retrieval import RetrievalTask

    world = SyntheticWorld(image_size=16, seed=0)
    loaders = make_retrieval_loaders(world, build_word_tokenizer(world.vocabulary()), n_train=16, n_val=8, n_test=8,
                                     batch_size=8, seed=0)
    ckpt_io.write_checkpoint(tmp_path / "c", state, {"t": torch.zeros(1)})
    with pytest.raises(comp_vlm.CheckpointError, match="incomplete or corrupt"):
        comp_vlm.prune(make_clip(0), RetrievalTask(), loaders.train, loaders.val,
                       quick(ratio=0.3, checkpoint_dir=str(tmp_path / "c"), resume=True))
