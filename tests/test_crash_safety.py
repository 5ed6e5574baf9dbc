"""A real ``comp-vlm prune`` process killed (SIGKILL, at a named step through the COMP_VLM_FAULT test hook) while it
replaces its search checkpoint, while it commits its output, and while it replaces an earlier output: every
output is complete or absent, and the next run resumes or restores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from test_cli import FAST, dense_dir  # noqa: F401  (fixture)

from comp_vlm.cli import main
from comp_vlm.io import WEIGHTS_FILE
from comp_vlm.outputs import MARKER, read_marker


def prune_cli(dense, out, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("COMP_VLM_FAULT", None)
    if fault:
        env["COMP_VLM_FAULT"] = fault
    args = ["prune", "--model", str(dense), "--out", str(out), "--snapshots", "0.3", *FAST, *extra]
    return subprocess.run([sys.executable, "-m", "comp_vlm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def hidden(directory, name: str) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f".{name}."))


def assert_complete(out) -> None:
    """A whole prune output: final model, snapshot, stage log, report, and a complete marker."""
    marker = read_marker(out)
    assert marker is not None and marker["complete"] and marker["kind"] == "prune-run"
    for name in (WEIGHTS_FILE, "comp_recipe.json", "stages.jsonl", "report.json"):
        assert (out / name).is_file(), name
    assert (out / "snapshots" / "r0.30" / WEIGHTS_FILE).is_file()
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}


def test_killed_at_a_checkpoint_swap_and_at_the_save_then_resumed(dense_dir, tmp_path, capsys):  # noqa: F811
    out, ckpt = tmp_path / "run", tmp_path / "run.ckpt"
    # 1. killed between the two renames of the second checkpoint replacement: only the moved-aside copy is left
    proc = prune_cli(dense_dir, out, fault="checkpoint:swap:2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists() and not ckpt.exists()
    aside = [tmp_path / n for n in hidden(tmp_path, "run.ckpt") if ".old-" in n]
    assert len(aside) == 1
    state = json.loads((aside[0] / "state.json").read_text())
    stage = state["pruner"]["stage_index"]
    state["pruner"]["elapsed_s"] = 1e6  # the killed run's time, so the report's total can be checked exactly
    (aside[0] / "state.json").write_text(json.dumps(state))
    # 2. --resume continues from it; killed again with everything written in the temporary output
    proc = prune_cli(dense_dir, out, "--resume", fault="prune-run:commit")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert f"resumed the search from {ckpt} at stage {stage}" in proc.stderr
    assert not out.exists() and ckpt.is_dir()
    assert any(".tmp-" in n for n in hidden(tmp_path, "run"))
    # 3. the next --resume finishes: one complete output, no leftovers, the killed runs' seconds counted
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--snapshots", "0.3", "--resume",
                 *FAST]) == 0
    assert "resumed the search" in capsys.readouterr().err
    assert_complete(out)
    assert json.loads((out / "report.json").read_text())["seconds"] >= 1e6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_killed_while_replacing_an_earlier_output(dense_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--snapshots", "0.3", "-q", *FAST]) == 0
    earlier = (out / WEIGHTS_FILE).read_bytes()
    proc = prune_cli(dense_dir, out, "--overwrite", "--seed", "1", fault="prune-run:swap")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()  # the earlier output lies aside, complete; the new one is not in place
    assert len([n for n in hidden(tmp_path, "run") if ".old-" in n]) == 1
    capsys.readouterr()
    assert main(["eval", str(out)]) == 1
    assert ".run.old-" in capsys.readouterr().err  # a reader names where the earlier output lies
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--snapshots", "0.3", *FAST]) == 1
    assert "--overwrite" in capsys.readouterr().err  # the earlier output is back, and protected again
    assert (out / WEIGHTS_FILE).read_bytes() == earlier
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--snapshots", "0.3", "--overwrite",
                 "--seed", "1", "-q", *FAST]) == 0
    assert_complete(out)
    assert (out / WEIGHTS_FILE).read_bytes() != earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
