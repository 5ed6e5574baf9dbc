"""The command line: help, one-line errors, the quick demo end to end (saved model in a transformers pipeline),
eval, bench and prune on the demo's outputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import comp_vlm
from comp_vlm.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "comp_vlm.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("comp-vlm: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-cache", "--quiet"]) == 0
    return out


# ---- help and usage -------------------------------------------------------------------------------------------
def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "prune", "eval", "bench"):
        assert command in text


@pytest.mark.parametrize("command", ["demo", "prune", "eval", "bench"])
def test_subcommand_help_exits_zero(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "usage: comp-vlm " + command in capsys.readouterr().out


def test_usage_error_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--ratio", "0.5"])  # --model and --out missing
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--ratio", "lots"])
    assert exc.value.code == 2


# ---- one-line errors ------------------------------------------------------------------------------------------
def test_bad_ratio_subprocess(tmp_path):
    proc = run_cli("prune", "--model", "demo-clip-quick", "--ratio", "1.5", "--out", str(tmp_path / "o"))
    assert proc.returncode == 1
    assert "ratio" in one_error_line(proc.stderr)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gallery", ["1", "5000"])
def test_bad_gallery_size_is_one_line(tmp_path, capsys, gallery):
    code = main(["prune", "--model", "demo-clip-quick", "--ratio", "0.5", "--gallery-size", gallery,
                 "--out", str(tmp_path / "o")])
    assert code == 1
    assert "--gallery-size" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "o").exists()


def test_bad_ratio_demo(tmp_path, capsys):
    assert main(["demo", "--quick", "--ratio", "0", "--out", str(tmp_path / "d"), "--no-cache"]) == 1
    assert "ratio" in one_error_line(capsys.readouterr().err)


def test_missing_model_dir(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 1
    assert "nope" in one_error_line(capsys.readouterr().err)
    assert main(["bench", str(tmp_path / "nope")]) == 1
    one_error_line(capsys.readouterr().err)
    assert main(["prune", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    one_error_line(capsys.readouterr().err)


def test_corrupt_recipe(demo_out, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(demo_out / "pruned", bad)
    (bad / "comp_recipe.json").write_text('{"format_version": 1, "towers": ')
    assert main(["eval", str(bad)]) == 1
    assert "recipe" in one_error_line(capsys.readouterr().err)
    (bad / "comp_recipe.json").write_text(json.dumps({"format_version": 1, "family": "clip"}))
    assert main(["bench", str(bad)]) == 1
    assert "recipe" in one_error_line(capsys.readouterr().err)


def test_data_directory_not_supported_yet(demo_out, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    assert main(["prune", "--model", str(demo_out / "dense"), "--data", str(data), "--out", str(tmp_path / "o")]) == 1
    assert "not supported" in one_error_line(capsys.readouterr().err)


# ---- the quick demo -------------------------------------------------------------------------------------------
def test_demo_writes_everything(demo_out):
    pruned = demo_out / "pruned"
    for name in ("model.safetensors", "config.json", "comp_recipe.json", "tokenizer.json", "preprocessor_config.json"):
        assert (pruned / name).is_file(), name
    assert (demo_out / "plot.png").stat().st_size > 1000
    stages = [json.loads(line) for line in (demo_out / "stages.jsonl").read_text().splitlines()]
    assert stages and {"mode", "flops_kept", "cost"} <= set(stages[0])
    report = json.loads((demo_out / "report.json").read_text())
    names = [r["name"] for r in report["rows"]]
    assert names[0] == "dense" and any("CoMP 80%" in n for n in names)
    assert report["processor_gap"] < 1e-5 and report["reload_gap"] < 1e-4
    recipe = comp_vlm.read_recipe(pruned)
    assert recipe.flops_kept <= 0.2 + 1e-9
    assert recipe.extra["data"]["kind"] == "synthetic"
    assert (demo_out / "dense" / "config.json").is_file()


def test_saved_demo_model_runs_in_zero_shot_pipeline(demo_out):
    from transformers import AutoImageProcessor, AutoTokenizer, pipeline

    from comp_vlm.data.processor import ProcessorWorld, to_pil

    directory = demo_out / "pruned"
    model = comp_vlm.load_pruned(directory)
    clf = pipeline("zero-shot-image-classification", model=model, tokenizer=AutoTokenizer.from_pretrained(directory),
                   image_processor=AutoImageProcessor.from_pretrained(directory))
    raw, captions = ProcessorWorld(image_size=16, max_objects=2, seed=3).sample_raw(4, seed=1)
    labels = ["a photo of a big red circle", "a photo of a small blue square", captions[0]]
    out = clf(to_pil(raw)[0], candidate_labels=labels)  # the default "This is a photo of {}." template pads
    assert sorted(o["label"] for o in out) == sorted(labels)
    assert abs(sum(o["score"] for o in out) - 1.0) < 1e-4
    # the saved processor reproduces the training normalisation exactly
    settings = comp_vlm.read_recipe(directory).extra["data"]
    world = ProcessorWorld(image_size=16, max_objects=2, seed=0, mean=settings["image_mean"], std=settings["image_std"])
    proc = AutoImageProcessor.from_pretrained(directory)
    got = proc(to_pil(raw), return_tensors="pt")["pixel_values"]
    assert torch.allclose(got, world.normalise(raw), atol=1e-5)


def test_eval_prints_metrics(demo_out, tmp_path, capsys):
    path = tmp_path / "eval.json"
    assert main(["eval", str(demo_out / "pruned"), "--task", "retrieval", "--data", "synthetic", "--json", str(path)]) == 0
    text = capsys.readouterr().out
    assert "r1_mean" in text and "GFLOPs" in text
    result = json.loads(path.read_text())
    report = json.loads((demo_out / "report.json").read_text())
    final = next(r for r in report["rows"] if "CoMP 80%" in r["name"])
    assert result["metrics"]["r1_mean"] == pytest.approx(final["metrics"]["r1_mean"])  # the same test split
    assert result["flops_kept"] <= 0.2 + 1e-9


def test_bench_writes_json(demo_out, tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", str(demo_out / "pruned"), "--dense", str(demo_out / "dense"), "--batch-sizes", "1,2",
                 "--text-lengths", "6", "--repeats", "2", "--warmup", "1", "--json", str(path)]) == 0
    assert "speed-up" in capsys.readouterr().out
    result = json.loads(path.read_text())
    assert [(r["batch"], r["text_length"]) for r in result["results"]] == [(1, 6), (2, 6)]
    row = result["results"][0]
    assert row["pruned"]["flops"] < row["dense"]["flops"]


def test_prune_a_model_directory(demo_out, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", str(demo_out / "dense"), "--data", "synthetic", "--ratio", "0.5", "--out", str(out),
            "--n-train", "128", "--n-val", "32", "--n-test", "32", "--stage-steps", "2", "--flops-step", "0.3",
            "--finetune-steps", "1", "--calibration-batches", "1", "--cost-measure", "immediate", "--resume",
            "--quiet"]
    assert main(args) == 0
    assert "pruned model" in capsys.readouterr().out
    recipe = comp_vlm.read_recipe(out)
    assert recipe.flops_kept <= 0.5 + 1e-9
    assert (out / "stages.jsonl").is_file() and (out / "tokenizer.json").is_file()
    stages = [json.loads(x) for x in (out / "stages.jsonl").read_text().splitlines()]
    assert stages and all(s["b_removed"] is not None for s in stages)  # --cost-measure reached the engine
    assert not out.with_name("p.ckpt").exists()  # the search checkpoint is removed after success
    assert main(["eval", str(out), "--quiet"]) == 0
    assert "r1_mean" in capsys.readouterr().out
