"""The paths a user of their own model takes (issue 19, sections 2, 3, 6 and 7): any target ratio in (0, 1), snapshots
below the ratio, a model directory that must name its data, captions that do not fit the model, empty captions,
strict JSON, a closed output pipe, output streams, and errors that name the flags."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import WORDS, tiny_clip_config
from test_cli import one_error_line
from test_cli_data import COCO, TINY, clip_dir, processor, tokenizer  # noqa: F401  (fixtures)
from transformers import CLIPModel

import comp_vlm
from comp_vlm import Pruner, demo
from comp_vlm.cli import main
from comp_vlm.data.karpathy import read_karpathy
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.errors import ConfigError, DataError
from comp_vlm.report import say, write_json, write_jsonl


def _without(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag`` and its value."""
    if flag not in args:
        return list(args)
    i = args.index(flag)
    return args[:i] + args[i + 2:]


TARGETS = _without(TINY, "--ratio")


def _strict_json(text: str) -> object:
    def refuse(constant: str) -> object:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ---- §2: any ratio in (0, 1) -----------------------------------------------------------------------------------
def test_ratio_keys():
    from comp_vlm.validation import ratio_key

    assert [ratio_key(r) for r in (0.3, 0.5, 0.333, 0.301, 0.1)] == ["0.30", "0.50", "0.333", "0.301", "0.10"]
    assert ratio_key(0.30001) == ratio_key(0.3)


def test_off_grid_ratios_prune_save_and_resume(clip_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "p"
    args = ["prune", "--model", str(clip_dir), "--data", str(COCO), "--out", str(out), "--ratio", "0.333",
            "--snapshots", "0.301", "--keep-checkpoint", "-q", *TARGETS]
    assert main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert sorted(report["snapshots"]) == ["0.301", "0.333"]
    assert report["snapshots"]["0.333"]["dir"] == str(out)
    assert report["snapshots"]["0.301"]["dir"] == str(out / "snapshots" / "r0.301")
    assert comp_vlm.read_recipe(out).flops_kept <= 1 - 0.333 + 1e-9
    assert comp_vlm.read_recipe(out / "snapshots" / "r0.301").flops_kept <= 1 - 0.301 + 1e-9
    assert "snapshot 0.301:" in capsys.readouterr().out
    # --resume from the kept checkpoint writes the same targets
    assert main([*args, "--resume", "--overwrite"]) == 0, capsys.readouterr().err
    assert sorted(json.loads((out / "report.json").read_text())["snapshots"]) == ["0.301", "0.333"]


@pytest.mark.parametrize("targets", [("0.30001", "0.3"), ("0.5", "0.301,0.30102")])
def test_targets_with_one_key_are_refused_before_any_work(clip_dir, tmp_path, capsys, targets):  # noqa: F811
    ratio, snapshots = targets
    out = tmp_path / "o"
    assert main(["prune", "--model", str(clip_dir), "--data", str(COCO), "--out", str(out), "--ratio", ratio,
                 "--snapshots", snapshots, *TARGETS]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--snapshots" in line and "same target" in line
    assert not out.exists() and not out.with_name("o.ckpt").exists()
    with pytest.raises(ConfigError, match="same target"):
        comp_vlm.PruneConfig(ratio=float(ratio), snapshots=tuple(float(s) for s in snapshots.split(",")))


# ---- §3: snapshots above the ratio -----------------------------------------------------------------------------
def test_a_snapshot_above_the_ratio_is_refused(clip_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    assert main(["prune", "--model", str(clip_dir), "--data", str(COCO), "--out", str(out), "--ratio", "0.3",
                 "--snapshots", "0.5", *TARGETS]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--snapshots 0.5" in line and "--ratio 0.3" in line
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"snapshots 0\.5 exceeds ratio 0\.3"):
        comp_vlm.PruneConfig(ratio=0.3, snapshots=(0.2, 0.5))
    assert comp_vlm.PruneConfig(ratio=0.3, snapshots=(0.2, 0.3)).targets == [0.2, 0.3]


# ---- §6: a model directory names its data ----------------------------------------------------------------------
def test_a_model_directory_needs_data(clip_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "o"
    assert main(["prune", "--model", str(clip_dir), "--out", str(out), *TINY]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--data DIR" in line and "--data synthetic" in line and str(clip_dir) in line
    assert not out.exists()
    assert main(["eval", str(clip_dir)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "--data DIR" in line and "--data synthetic" in line
    with pytest.raises(ConfigError, match="data=DIR .* data=synthetic"):
        comp_vlm.evaluate_dir(clip_dir)


@pytest.fixture(scope="module")
def short_text_dir(tmp_path_factory) -> Path:
    """A tiny dense CLIP of the synthetic world's words with only 5 text positions: its captions are longer."""
    config = tiny_clip_config()
    config.text_config.max_position_embeddings = 5
    model = CLIPModel._from_config(config).eval()
    return demo.save_dense_dir(model, tmp_path_factory.mktemp("short") / "dense", build_word_tokenizer(WORDS),
                               processor())


def test_synthetic_captions_longer_than_the_text_positions_are_one_line(short_text_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", "--model", str(short_text_dir), "--data", "synthetic", "--out", str(out), "--n-train", "16",
                 "--n-val", "8", "--n-test", "8", *TINY]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "the synthetic world" in line and "5 text positions" in line
    assert not out.exists()
    assert main(["eval", str(short_text_dir), "--data", "synthetic", "--n-test", "8"]) == 1
    assert "5 text positions" in one_error_line(capsys.readouterr().err)


# ---- §7: empty captions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("caption", ["", "  \t "])
def test_empty_captions_are_refused_naming_the_entry(clip_dir, tmp_path, capsys, caption):  # noqa: F811
    data = tmp_path / "coco"
    shutil.copytree(COCO, data)
    path = data / "dataset_coco.json"
    document = json.loads(path.read_text())
    document["images"][1]["sentences"][2]["raw"] = caption
    path.write_text(json.dumps(document))
    with pytest.raises(DataError, match=r"images\[1\]\.sentences\[2\]: empty caption"):
        read_karpathy(data, check_images=False)
    out = tmp_path / "o"
    assert main(["prune", "--model", str(clip_dir), "--data", str(data), "--out", str(out), *TINY]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(path.resolve()) in line or str(path) in line
    assert "images[1].sentences[2]: empty caption" in line


# ---- §7: strict JSON -------------------------------------------------------------------------------------------
def test_non_finite_numbers_are_written_as_null(tmp_path):
    records = [{"stage": 1, "metric": float("nan"), "cost": [1.5, float("inf")], "nested": {"b": -float("inf")}}]
    write_jsonl(tmp_path / "stages.jsonl", records)
    line = (tmp_path / "stages.jsonl").read_text().splitlines()[0]
    assert _strict_json(line) == {"stage": 1, "metric": None, "cost": [1.5, None], "nested": {"b": None}}
    write_json(tmp_path / "report.json", {"metrics": {"r1": float("nan")}})
    assert _strict_json((tmp_path / "report.json").read_text()) == {"metrics": {"r1": None}}


def test_the_python_api_stage_log_is_strict_json(tmp_path):
    """``PruneConfig(log_path=...)``: the search's own stages.jsonl (the Python API's) is strict JSON too."""
    log = tmp_path / "stages.jsonl"
    holder = SimpleNamespace(config=SimpleNamespace(log_path=str(log)))
    Pruner._write_log(holder, {"stage": 1, "cost": float("nan"), "se": float("inf")})
    assert _strict_json(log.read_text().splitlines()[0]) == {"stage": 1, "cost": None, "se": None}


# ---- §7: a closed output pipe ----------------------------------------------------------------------------------
def _with_closed_stdout(*args: str, unbuffered: bool = False) -> tuple[int, str]:
    """Run the CLI with its stdout a pipe whose reader has gone (as ``| head`` after its lines); its exit status
    and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **({"PYTHONUNBUFFERED": "1"} if unbuffered else {}))
    proc = subprocess.Popen([sys.executable, "-m", "comp_vlm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    proc.stdout.close()  # before the child writes anything: it is still importing
    err = proc.stderr.read()
    return proc.wait(timeout=120), err


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_closed_pipe_ends_quietly_with_141(clip_dir, unbuffered):  # noqa: F811
    """Buffered, the results fail at the final flush; unbuffered, at the first line."""
    assert _with_closed_stdout("eval", str(clip_dir), "--data", str(COCO), "-q", unbuffered=unbuffered) == (141, "")


def test_a_closed_pipe_ends_quietly_with_141_after_version():
    assert _with_closed_stdout("--version") == (141, "")


# ---- §7: output streams ----------------------------------------------------------------------------------------
def test_progress_lines_go_to_stderr(capsys):
    say("a progress line")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "a progress line\n"


def test_verbose_shows_transformers_warnings(monkeypatch, capsys):
    """-v lets transformers' warnings (unused weights, ...) through while the command runs; they are muted
    without it."""
    from transformers.utils import logging as hf_logging

    import comp_vlm.api

    shown = []

    def record_then_fail(*args, **kwargs):
        shown.append(hf_logging.get_logger("transformers.modeling_utils").isEnabledFor(logging.WARNING))
        raise ConfigError("stop here")

    monkeypatch.setattr(comp_vlm.api, "evaluate_dir", record_then_fail)
    assert main(["eval", "some-dir", "-v"]) == 1
    assert main(["eval", "some-dir"]) == 1
    assert shown == [True, False]


# ---- §7: errors name the flags ---------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--stage-steps", "1"), ("--flops-step", "0"), ("--token-floor", "0"),
                                        ("--ratio", "1.5")])
def test_errors_name_the_flag(clip_dir, tmp_path, capsys, flag, value):  # noqa: F811
    assert main(["prune", "--model", str(clip_dir), "--data", str(COCO), "--out", str(tmp_path / "o"),
                 *_without(TINY, flag), flag, value]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"comp-vlm: error: {flag} must be"), line
    assert flag[2:].replace("-", "_") not in line.replace(flag, "")
