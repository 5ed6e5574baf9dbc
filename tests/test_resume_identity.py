"""What `comp-vlm prune` resumes and where it writes (issue 19 §5, §7): a search checkpoint records the model's
and the data's identity, and resuming it on another model or other data is refused in one line, before any
work; a full disk while writing a checkpoint or the output is one line naming the path and the bytes it needs,
and the run resumes once space is freed; two runs on the same --out are kept apart by a lock."""

from __future__ import annotations

import errno
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import FAST, dense_dir, one_error_line  # noqa: F401  (fixture)
from test_cli_data import COCO, TINY, clip_dir, tokenizer  # noqa: F401  (fixtures)

from comp_vlm import checkpoint, outputs
from comp_vlm.cli import main
from comp_vlm.io import WEIGHTS_FILE
from comp_vlm.loading import load_dense_dir
from comp_vlm.search import state
from comp_vlm.tasks.retrieval import RetrievalTask


def prune(model, out, *extra: str) -> int:
    return main(["prune", "--model", str(model), "--out", str(out), "-q", *extra])


def kept_checkpoint(model, tmp_path, *extra: str) -> Path:
    """A finished run's search checkpoint, kept (--keep-checkpoint): a checkpoint to resume in-process."""
    assert prune(model, tmp_path / "first", "--keep-checkpoint", *extra) == 0
    ckpt = tmp_path / "first.ckpt"
    assert checkpoint.has_checkpoint(ckpt)
    return ckpt


def no_evaluation(monkeypatch) -> None:
    """Make any evaluation (the first compute of a prune after loading) fail the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the run computed before refusing")

    monkeypatch.setattr(RetrievalTask, "evaluate", fail)


def with_flag(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced by ``value``."""
    i = args.index(flag)
    return [*args[:i + 1], value, *args[i + 2:]]


# ---- §5: identity -----------------------------------------------------------------------------------------------
def test_resume_on_another_model_is_refused_naming_both(dense_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    ckpt = kept_checkpoint(dense_dir, tmp_path, *FAST)
    other = tmp_path / "other"
    shutil.copytree(dense_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    weights["logit_scale"] = weights["logit_scale"] + 1.0
    save_file(weights, str(other / "model.safetensors"), metadata={"format": "pt"})
    hashes = [state.weights_hash(load_dense_dir(d)) for d in (dense_dir, other)]
    assert hashes[0] != hashes[1]
    capsys.readouterr()
    no_evaluation(monkeypatch)
    before = (ckpt / checkpoint.STATE).read_text()
    assert prune(other, tmp_path / "second", "--checkpoint-dir", str(ckpt), "--resume", *FAST) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"search checkpoint {ckpt} is of another run" in line
    assert f"model {dense_dir} in the checkpoint, {other} now" in line
    assert f"model weights {hashes[0]} in the checkpoint, {hashes[1]} now" in line
    assert "data" not in line.split("): ")[0]  # the same data
    assert not (tmp_path / "second").exists() and (ckpt / checkpoint.STATE).read_text() == before
    # the synthetic world made with other settings is other data
    assert prune(dense_dir, tmp_path / "second", "--checkpoint-dir", str(ckpt), "--resume",
                 *with_flag(FAST, "--n-train", "96")) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "data n_train 64 in the checkpoint, 96 now" in line and "weights" not in line


def test_resume_on_other_data_is_refused_naming_both(clip_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    data = tmp_path / "coco"
    shutil.copytree(COCO, data)
    ckpt = kept_checkpoint(clip_dir, tmp_path, "--data", str(data), *TINY)
    recorded = json.loads((ckpt / checkpoint.STATE).read_text())["identity"]["data"]
    assert recorded["json"] == str((data / "dataset_coco.json").resolve())
    assert recorded["sha256"] == state.file_hash(data / "dataset_coco.json")
    # the same path, other captions
    dataset = json.loads((data / "dataset_coco.json").read_text())
    captions = dataset["images"][0]["sentences"]
    captions[0], captions[1] = captions[1], captions[0]
    (data / "dataset_coco.json").write_text(json.dumps(dataset))
    now = state.file_hash(data / "dataset_coco.json")
    capsys.readouterr()
    no_evaluation(monkeypatch)
    assert prune(clip_dir, tmp_path / "second", "--data", str(data), "--checkpoint-dir", str(ckpt), "--resume",
                 *TINY) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"data sha256 {recorded['sha256']} in the checkpoint, {now} now" in line
    assert "model" not in line.split("): ")[0].split("(", 1)[1]
    # another directory
    assert prune(clip_dir, tmp_path / "second", "--data", str(COCO), "--checkpoint-dir", str(ckpt), "--resume",
                 *TINY) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"data json {recorded['json']} in the checkpoint, {(COCO / 'dataset_coco.json').resolve()} now" in line


def test_resume_on_the_same_model_and_data_works_and_old_checkpoints_warn(dense_dir, tmp_path,  # noqa: F811
                                                                          capsys):
    ckpt = kept_checkpoint(dense_dir, tmp_path, *FAST)
    identity = json.loads((ckpt / checkpoint.STATE).read_text())["identity"]
    assert identity["model"] == {"config": state.config_hash(load_dense_dir(dense_dir).config),
                                 "weights": state.weights_hash(load_dense_dir(dense_dir)), "source": str(dense_dir)}
    assert identity["data"]["kind"] == "synthetic" and identity["data"]["n_train"] == 64
    capsys.readouterr()
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "second"), "--checkpoint-dir",
                 str(ckpt), "--resume", "--keep-checkpoint", *FAST]) == 0
    err = capsys.readouterr().err
    assert "resumed the search" in err and "identity" not in err
    # a checkpoint written before identities were recorded: resumed, with a warning that it cannot be checked
    saved = json.loads((ckpt / checkpoint.STATE).read_text())
    del saved["identity"]
    (ckpt / checkpoint.STATE).write_text(json.dumps(saved))
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "third"), "--checkpoint-dir",
                 str(ckpt), "--resume", *FAST]) == 0
    err = capsys.readouterr().err
    assert "records no model or data identity" in err and "resumed the search" in err


def test_the_library_refuses_to_resume_on_another_model_before_any_work(tmp_path, monkeypatch):
    from tiny_clip import fresh, quick, tiny_setup

    import comp_vlm
    from comp_vlm.search import pruner

    cfg, _, loaders = tiny_setup()
    ckpt = str(tmp_path / "c")
    comp_vlm.prune(fresh(cfg), RetrievalTask(), loaders.train, loaders.val,
                   quick(ratio=0.2, finetune_steps=0, checkpoint_dir=ckpt))
    other = fresh(cfg)
    with torch.no_grad():
        other.logit_scale.add_(1.0)
    monkeypatch.setattr(pruner.Pruner, "__init__", lambda *a, **k: pytest.fail("the search started"))
    with pytest.raises(comp_vlm.CheckpointError, match=f"model weights {state.weights_hash(fresh(cfg))} in the "
                                                       f"checkpoint, {state.weights_hash(other)} now"):
        comp_vlm.prune(other, RetrievalTask(), loaders.train, loaders.val,
                       quick(ratio=0.2, finetune_steps=0, checkpoint_dir=ckpt, resume=True))


def test_weights_hash_covers_names_dtypes_shapes_and_bytes():
    from conftest import make_clip

    model = make_clip()
    base = state.weights_hash(model)
    assert state.weights_hash(make_clip()) == base  # deterministic
    with torch.no_grad():
        model.logit_scale.add_(1e-3)
    assert state.weights_hash(model) != base
    with torch.no_grad():
        model.logit_scale.sub_(1e-3)
    assert state.weights_hash(model) == base
    assert state.weights_hash(make_clip().to(torch.float64)) != base


# ---- §7: a full disk --------------------------------------------------------------------------------------------
FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # what safetensors raises


def fill_disk_at(monkeypatch, hits: set[int], where: str = "") -> list[int]:
    """Make safetensors' writer fail as on a full disk at the given calls (counted from 1) whose path holds
    ``where``; returns the list of the calls' file sizes (had they been written)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def save(tensors, filename, metadata=None):
        if where in str(filename):
            scratch = Path(filename).with_name("scratch")
            real(tensors, str(scratch), metadata=metadata)
            calls.append(scratch.stat().st_size)
            scratch.unlink()
            if len(calls) in hits:
                Path(filename).write_bytes(b"\0" * 100)  # a partly written file
                raise SafetensorError(FULL)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    return calls


def test_full_disk_at_a_checkpoint_and_at_the_save_then_resumed(dense_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                 capsys):
    out, ckpt = tmp_path / "run", tmp_path / "run.ckpt"
    calls = fill_disk_at(monkeypatch, {2}, where="run.ckpt")  # the first stage's checkpoint
    assert prune(dense_dir, out, *FAST) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"comp-vlm: error: no space left on device for {ckpt}: it needs ")
    needed = int(line.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert calls[1] - 16 <= needed <= calls[1] + 100_000  # its tensors' file and its state.json
    assert (ckpt / checkpoint.TENSORS).stat().st_size == calls[0] != calls[1]  # the previous checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt"]  # no temporary leftovers, no lock
    monkeypatch.undo()
    # space freed: --resume continues; then the disk fills up while the output is written
    calls = fill_disk_at(monkeypatch, {1}, where=".run.tmp-")
    assert prune(dense_dir, out, "--resume", *FAST) == 1
    line = one_error_line(capsys.readouterr().err)
    assert len(calls) == 1 and f"no space left on device for {out / WEIGHTS_FILE}: it needs " in line
    needed = int(line.split("it needs ")[1].split(" bytes")[0].replace(",", ""))
    assert abs(needed - calls[0]) <= 16
    assert not out.exists() and checkpoint.has_checkpoint(ckpt)
    monkeypatch.undo()
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--resume", *FAST]) == 0
    assert "resumed the search" in capsys.readouterr().err
    assert (out / WEIGHTS_FILE).is_file() and not ckpt.exists()


def test_a_full_disk_in_a_staged_output_names_it(tmp_path):
    target = tmp_path / "never-written"
    with pytest.raises(outputs.NoSpaceError) as exc, outputs.staged(target, "pruned") as tmp:
        (tmp / "a").write_bytes(b"x" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(exc.value).startswith(f"no space left on device for {target}: it needs more than 1,0")
    assert not any(tmp_path.iterdir())  # the unfinished output deleted
    with pytest.raises(outputs.NoSpaceError) as exc, outputs.writing(target / "model.safetensors", 12345):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert f"{target / 'model.safetensors'}: it needs 12,345 bytes" in str(exc.value)
    with pytest.raises(OSError) as exc, outputs.writing(target, 1):
        raise OSError(errno.EACCES, "Permission denied")  # not a full disk: unchanged
    assert not isinstance(exc.value, outputs.NoSpaceError)


def test_safetensors_bytes_is_the_file_size(tmp_path):
    from conftest import make_clip

    tensors = dict(make_clip().state_dict())
    tensors["rng"] = torch.zeros(5056, dtype=torch.uint8)
    tensors["step"] = torch.tensor(3)
    save_file(tensors, str(tmp_path / "t.safetensors"))
    size = (tmp_path / "t.safetensors").stat().st_size
    assert abs(checkpoint.safetensors_bytes(tensors) - size) <= 16


# ---- §7: one run per --out --------------------------------------------------------------------------------------
def test_a_second_run_on_the_same_out_is_refused_at_once(dense_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    out = tmp_path / "run"
    no_evaluation(monkeypatch)
    with outputs.run_lock(out) as lock:
        assert lock == tmp_path / "run.lock"
        held = json.loads(lock.read_text())
        assert held["pid"] > 0 and held["host"] == socket.gethostname()
        assert prune(dense_dir, out, *FAST) == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"--out {out} is being written by another comp-vlm run (pid {held['pid']} on host " \
               f"{held['host']}, since {held['started']}" in line
        assert json.loads(lock.read_text()) == held  # the holder's lock untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # released
    # a lock of another host is never judged stale
    (tmp_path / "run.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "then"}))
    assert prune(dense_dir, out, *FAST) == 1
    assert "pid 1 on host elsewhere, since then" in one_error_line(capsys.readouterr().err)


def test_a_stale_lock_is_taken_over(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not outputs.pid_alive(proc.pid)
    lock = tmp_path / "new" / "run.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": proc.pid, "host": socket.gethostname(), "started": "then"}))
    with outputs.run_lock(tmp_path / "new" / "run") as taken:
        assert taken == lock and json.loads(lock.read_text())["pid"] == outputs.os.getpid()
    assert not lock.exists()
    # parents it made for the lock go with it when nothing else was written there
    with outputs.run_lock(tmp_path / "a" / "b" / "run") as taken:
        assert taken == tmp_path / "a" / "b" / "run.lock" and taken.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]
