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
from comp_vlm.io import WEIGHTS_FILE


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
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(out.parent / "cache"), "--quiet"]) == 0
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


# ---- the quick demo -------------------------------------------------------------------------------------------
def test_demo_writes_everything(demo_out):
    pruned = demo_out / "pruned"
    for name in (WEIGHTS_FILE, "config.json", "comp_recipe.json", "tokenizer.json", "preprocessor_config.json"):
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


# ---- reliability: outputs, one-line errors on every path (issue 14) ---------------------------------------------
FAST = ["--data", "synthetic", "--ratio", "0.5", "--n-train", "64", "--n-val", "32", "--n-test", "32", "--batch-size", "16",
        "--stage-steps", "2", "--flops-step", "0.1", "--finetune-steps", "1", "--calibration-batches", "1"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A dense model directory with the quick built-in's architecture, tokenizer and processor (random weights)."""
    from transformers import CLIPModel

    from comp_vlm import demo, zoo

    spec = zoo.BUILTINS["demo-clip-quick"]
    world = zoo.make_world(spec.image_size, spec.max_objects, 0)
    tokenizer = zoo.build_tokenizer(world, spec)
    torch.manual_seed(0)
    model = CLIPModel._from_config(zoo.build_config(spec, tokenizer))
    return demo.save_dense_dir(model, tmp_path_factory.mktemp("dense") / "dense", tokenizer,
                               world.image_processor())


def test_usage_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--ratio", "0.5"])
    assert exc.value.code == 2
    assert "--model" in one_error_line(capsys.readouterr().err)


def test_out_never_replaces_a_foreign_directory(tmp_path, capsys):
    out = tmp_path / "x"
    (out / "sub").mkdir(parents=True)
    (out / "precious.txt").write_text("keep\n")
    assert main(["prune", "--model", "demo-clip-quick", "--ratio", "0.5", "--out", str(out),
                 "--cache", str(tmp_path / "cache")]) == 1
    assert "not written by comp-vlm" in one_error_line(capsys.readouterr().err)
    assert (out / "precious.txt").read_text() == "keep\n" and (out / "sub").is_dir()
    assert not (tmp_path / "cache").exists()  # refused before any training


@pytest.mark.parametrize("where", ["model", "model-parent", "cwd", "dot", "dotdot"])
def test_out_refuses_the_model_and_current_directories_and_their_parents(dense_dir, tmp_path, monkeypatch, capsys,
                                                                          where):
    model = tmp_path / "models" / "clip"
    shutil.copytree(dense_dir, model)
    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    (work / "cache" / "weights.safetensors").write_text("cached")
    monkeypatch.chdir(work)
    out = {"model": str(model), "model-parent": str(model.parent), "cwd": str(work), "dot": ".", "dotdot": ".."}[where]
    before = sorted(p.name for p in model.iterdir())
    assert main(["prune", "--model", str(model), "--out", out, "--overwrite", *FAST]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert ("current directory" if where in ("cwd", "dot", "dotdot") else str(model)) in line
    assert sorted(p.name for p in model.iterdir()) == before
    assert (work / "cache" / "weights.safetensors").read_text() == "cached"


def test_out_needs_overwrite_to_replace_an_earlier_output(dense_dir, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--quiet", *FAST]) == 0
    first = (out / WEIGHTS_FILE).read_bytes()
    capsys.readouterr()
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--quiet", *FAST]) == 1
    assert "--overwrite" in one_error_line(capsys.readouterr().err)
    assert (out / WEIGHTS_FILE).read_bytes() == first
    assert main(["prune", "--model", str(dense_dir), "--out", str(out), "--quiet", "--overwrite", "--seed", "1",
                 *FAST]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]  # no temporary directories, checkpoint removed


def test_earlier_search_checkpoint_needs_resume_or_overwrite(dense_dir, tmp_path, capsys):
    from comp_vlm import checkpoint

    checkpoint.write_checkpoint(tmp_path / "p.ckpt", {"config": {}}, {"t": torch.zeros(1)})
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "p"), *FAST]) == 1
    assert "--resume" in one_error_line(capsys.readouterr().err)
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "notes.txt").write_text("mine")
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "q"), "--checkpoint-dir",
                 str(tmp_path / "own"), *FAST]) == 1
    assert "not written by comp-vlm" in one_error_line(capsys.readouterr().err)
    assert (tmp_path / "own" / "notes.txt").read_text() == "mine"


def test_resume_from_an_empty_state_is_one_line(dense_dir, tmp_path, capsys):
    from comp_vlm import checkpoint

    checkpoint.write_checkpoint(tmp_path / "p.ckpt", {}, {"t": torch.zeros(1)})
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "p"), "--resume", "--quiet",
                 *FAST]) == 1
    assert "incomplete or corrupt" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "p").exists()


def test_unwritable_out_is_refused_before_the_search(dense_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "file" / "out"), *FAST]) == 1
    captured = capsys.readouterr()
    assert "not a directory" in one_error_line(captured.err)
    assert captured.out == ""  # nothing loaded, nothing searched
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "--checkpoint-dir",
                 str(tmp_path / "file" / "ck"), *FAST]) == 1
    assert "--checkpoint-dir" in one_error_line(capsys.readouterr().err)


def test_read_only_out_is_refused_before_the_search(dense_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        try:
            (locked / "probe").mkdir()
        except PermissionError:
            pass
        else:
            pytest.skip("this user writes into read-only directories (root)")
        assert main(["prune", "--model", str(dense_dir), "--out", str(locked / "out"), *FAST]) == 1
        captured = capsys.readouterr()
        assert "cannot write" in one_error_line(captured.err) and captured.out == ""
    finally:
        locked.chmod(0o755)


def test_quiet_prints_results_only(dense_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(dense_dir), "--out", str(tmp_path / "p"), "-q", *FAST]) == 0
    captured = capsys.readouterr()
    assert "pruned model:" in captured.out and "r1_mean" in captured.out
    for line in captured.out.splitlines():
        assert not line.startswith(("model: ", "dense test", "CoMP search", "--resume")), line
    assert captured.err == ""


def test_eval_json_directory_is_refused_before_evaluating(demo_out, tmp_path, capsys):
    (tmp_path / "j").mkdir()
    assert main(["eval", str(demo_out / "pruned"), "--json", str(tmp_path / "j")]) == 1
    captured = capsys.readouterr()
    assert "--json" in one_error_line(captured.err)
    assert captured.out == ""  # refused before the evaluation
    assert main(["bench", str(demo_out / "pruned"), "--json", str(tmp_path / "j")]) == 1
    assert "--json" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("args", "option"),
    [(["eval", "{pruned}", "--n-test", "0"], "--n-test"),
     (["eval", "{pruned}", "--n-test", "-5", "--gallery-size", "0"], "--n-test"),
     (["bench", "{pruned}", "--repeats", "0"], "--repeats"),
     (["bench", "{pruned}", "--warmup", "-1"], "--warmup"),
     (["prune", "--model", "{dense}", "--out", "{tmp}/o", "--n-train", "0"], "--n-train")],
)
def test_bad_counts_are_one_line(demo_out, tmp_path, capsys, args, option):
    args = [a.format(pruned=demo_out / "pruned", dense=demo_out / "dense", tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert option in one_error_line(capsys.readouterr().err)


def test_broken_dense_directories_are_one_line(dense_dir, tmp_path, capsys):
    truncated = tmp_path / "truncated"
    shutil.copytree(dense_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    pickled = tmp_path / "pickled"
    shutil.copytree(dense_dir, pickled)
    from safetensors.torch import load_file

    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    for directory, message in ((truncated, "cannot load"), (pickled, "never a pickle")):
        assert main(["eval", str(directory)]) == 1
        assert message in one_error_line(capsys.readouterr().err)
        assert main(["prune", "--model", str(directory), "--out", str(tmp_path / "o"), *FAST]) == 1
        assert message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep")
    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-cache"]) == 1
    assert "not written by comp-vlm" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["precious.txt"]


def test_demo_replaces_its_own_output_and_quiet_prints_one_line(demo_out, capsys):
    stale = demo_out / "snapshots" / "r0.99"
    stale.mkdir()  # something the earlier run left (in its own output): replaced with the rest
    assert main(["demo", "--quick", "--out", str(demo_out), "--cache", str(demo_out.parent / "cache"), "-q"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.strip().splitlines()) == 1 and "R@1" in captured.out
    assert not stale.exists() and (demo_out / "pruned" / WEIGHTS_FILE).is_file()


def test_quick_builtin_learns(demo_out):
    rows = {r["name"]: r["metrics"]["r1_mean"] for r in json.loads((demo_out / "report.json").read_text())["rows"]}
    assert rows["dense"] > 30  # chance is about 5 in galleries of 32 (24 distinct captions)
    assert min(rows.values()) > 15


# ---- the revised search options reach the engine --------------------------------------------------------------
SEARCH_FLAGS = {"cost_measure": "probe", "selection": "per-flop", "token_plan": "geometric", "token_max_cut": 0.3,
                "token_floor": 0.2, "warmup_order": "fixed", "sliver_fraction": 0.1, "lr_schedule": "cosine",
                "finetune_schedule": "constant", "finetune_budget": "equal-total"}


class _Captured(Exception):
    pass


def _prune_config(monkeypatch, argv: list[str]) -> comp_vlm.PruneConfig:
    """The PruneConfig ``comp-vlm prune argv`` hands to the engine (the search itself is not run)."""
    seen = []

    def fake_prune(model, task, train, val, config, **kwargs):
        seen.append(config)
        raise _Captured

    monkeypatch.setattr(comp_vlm, "prune", fake_prune)
    with pytest.raises(_Captured):
        main(argv)
    return seen[0]


def test_search_flags_reach_the_prune_config(dense_dir, tmp_path, monkeypatch):
    base = ["prune", "--model", str(dense_dir), "--out", str(tmp_path / "o"), "-q", *FAST]
    defaults = comp_vlm.PruneConfig()
    config = _prune_config(monkeypatch, base)
    assert {k: getattr(config, k) for k in SEARCH_FLAGS} == {k: getattr(defaults, k) for k in SEARCH_FLAGS}
    flags = [a for k, v in SEARCH_FLAGS.items() for a in ("--" + k.replace("_", "-"), str(v))]
    config = _prune_config(monkeypatch, base + flags)
    assert {k: getattr(config, k) for k in SEARCH_FLAGS} == SEARCH_FLAGS
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag", ["--selection", "--token-plan", "--warmup-order", "--lr-schedule",
                                  "--finetune-schedule", "--finetune-budget"])
def test_bad_search_choice_is_one_line_exit_2(tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "demo-clip-quick", "--out", str(tmp_path / "o"), flag, "bogus"])
    assert exc.value.code == 2
    line = one_error_line(capsys.readouterr().err)
    assert flag in line and "invalid choice: 'bogus'" in line


@pytest.mark.parametrize(("flag", "value"), [("--token-max-cut", "0"), ("--token-floor", "1.5"),
                                            ("--sliver-fraction", "1")])
def test_search_value_out_of_range_is_one_line(tmp_path, capsys, flag, value):
    assert main(["prune", "--model", "demo-clip-quick", "--out", str(tmp_path / "o"), flag, value,
                 "--cache", str(tmp_path / "cache")]) == 1
    assert flag + " must be" in one_error_line(capsys.readouterr().err)  # the flag, not the PruneConfig field
    assert not (tmp_path / "cache").exists()  # refused before any training
