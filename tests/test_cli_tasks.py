"""``--task reasoning|vqa --data DIR``: `comp-vlm prune` and `eval` of tiny BLIP model directories on NLVR2 and
VQAv2 directories in their released formats (through the task registries), and the one-line errors of a task the
model cannot run and of data in another format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import WORDS, make_clip
from test_blip_tasks import write_nlvr2_dir, write_vqav2_dir
from test_cli import one_error_line
from tiny_blip import IMAGE, make_blip
from transformers import BlipImageProcessorPil

import comp_vlm
from comp_vlm import demo
from comp_vlm.cli import main
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.loading import load_dense_dir
from comp_vlm.tasks import make_task, task_data
from comp_vlm.tasks.base import mean_reference_lengths

TINY = ["--ratio", "0.2", "--flops-step", "0.2", "--stage-steps", "2", "--finetune-steps", "1",
        "--calibration-batches", "1", "--batch-size", "4", "-q"]
COCO = Path(__file__).parent / "fixtures" / "coco_karpathy"


def processor():
    return BlipImageProcessorPil(size={"height": IMAGE, "width": IMAGE})


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    """Model directories (BLIP retrieval and VQA, CLIP) with a tokenizer and image processor; NLVR2 and VQAv2
    directories."""
    root = tmp_path_factory.mktemp("tasks")
    tok = build_word_tokenizer(WORDS)
    found = {"reasoning": demo.save_dense_dir(make_blip(0), root / "blip-itm", tok, processor()),
             "vqa": demo.save_dense_dir(make_blip(0, vqa=True), root / "blip-vqa", tok, processor()),
             "clip": demo.save_dense_dir(make_clip(vocab=len(tok), eos_token_id=tok.eos_token_id, image_size=IMAGE,
                                                   patch=4), root / "clip", tok, processor()),
             "nlvr2": root / "nlvr2", "vqav2": root / "vqav2"}
    write_nlvr2_dir(found["nlvr2"])
    write_vqav2_dir(found["vqav2"])
    found["long"] = root / "long"  # NLVR2 whose test1 statements are longer than the models' 24 text positions
    shutil.copytree(found["nlvr2"], found["long"])
    rows = [json.loads(line) for line in (found["long"] / "data" / "test1.json").read_text().splitlines()]
    (found["long"] / "data" / "test1.json").write_text(
        "".join(json.dumps({**row, "sentence": " ".join(["red circle"] * 15)}) + "\n" for row in rows))
    return found


DATA = {"reasoning": "nlvr2", "vqa": "vqav2"}
#: samples per split of the fixtures: NLVR2 8/4/4 (train/dev/test1); VQAv2 12 train images (one held out for stage
#: costs, 1/12 of them) and 3 val images, two questions each
SPLITS = {"reasoning": (8, 4, 4), "vqa": (22, 2, 6)}


@pytest.mark.parametrize("name", ["reasoning", "vqa"])
def test_prune_and_eval_a_task_on_its_own_data_directory(name, dirs, tmp_path, capsys):
    model_dir, data = dirs[name], dirs[DATA[name]]
    out = tmp_path / "out"
    assert main(["prune", "--model", str(model_dir), "--task", name, "--data", str(data), "--out", str(out),
                 *TINY]) == 0
    assert "pruned model:" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    task = make_task(name)
    assert report["task"] == name and report["data"]["kind"] == "task" and report["data"]["task"] == name
    assert report["data"]["dir"] == str(data.resolve())
    assert tuple(report["data"][f"n_{r}"] for r in ("train", "val", "test")) == SPLITS[name]
    # the FLOPs reference: the means over every training record through the task's own loader
    dense = load_dense_dir(model_dir)
    tok, proc = comp_vlm.loading.load_model_tokenizer(model_dir, dense), processor()
    loaders = task_data(name)(data, dense, tok, proc, SPLITS[name][0], 64)
    expected = mean_reference_lengths(task, loaders.train)  # one batch of every record
    assert {k: report["reference"][k] for k in task.reference_keys} == {k: round(v) for k, v in expected.items()}
    # the dense metrics are those of the test split, the model running through its adapter
    comp_vlm.get_adapter(dense).install(comp_vlm.adapters.base.AdapterOptions(dead_compute=False))
    key = task.primary_metric
    assert report["dense"]["metrics"][key] == pytest.approx(task.evaluate(dense, loaders.test)[key])
    assert comp_vlm.read_recipe(out).extra["task"] == name

    # eval reads the task and the data from the recipe
    path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--json", str(path), "-q"]) == 0
    text = capsys.readouterr().out
    assert f"test split ({name}): {SPLITS[name][2]} samples" in text and key in text
    result = json.loads(path.read_text())
    assert (result["task"], result["primary_metric"], result["n"]) == (name, key, SPLITS[name][2])
    assert result["metrics"][key] == pytest.approx(report["snapshots"]["0.20"]["metrics"][key])
    assert result["flops_kept"] <= 0.8 + 1e-9
    # a dense model directory: --task and --data named
    assert main(["eval", str(model_dir), "--task", name, "--data", str(data), "-q"]) == 0
    assert f"{key}" in capsys.readouterr().out


BAD = {  # name: (model, task, data) -> what the one error line names
    "reasoning on VQA": ("vqa", "reasoning", "nlvr2",
                         ("task reasoning needs a BlipForImageTextRetrieval model, not BlipForQuestionAnswering "
                         "(tasks for BlipForQuestionAnswering: vqa)")),
    "reasoning on CLIP": ("clip", "reasoning", "nlvr2", "not CLIPModel (tasks for CLIPModel: retrieval)"),
    "retrieval on BLIP": ("reasoning", "retrieval", COCO,
                          "not BlipForImageTextRetrieval (tasks for BlipForImageTextRetrieval: reasoning)"),
    "VQAv2 for reasoning": ("reasoning", "reasoning", "vqav2", "split 'train' has no file"),
    "NLVR2 for vqa": ("vqa", "vqa", "nlvr2", "no questions file for subtype train2014 or train"),
    "Karpathy for reasoning": ("reasoning", "reasoning", COCO, "split 'train' has no file"),
    "synthetic for vqa": ("vqa", "vqa", "synthetic", ("--data synthetic (the built-in shapes world of retrieval) "
                                                     "cannot serve it")),
    "no such directory": ("vqa", "vqa", "nowhere", ("--data nowhere: no such directory (task vqa reads a data "
                                                  "directory in its own format)")),
    "no data": ("reasoning", "reasoning", None, "(a data directory in task reasoning's format)"),
    "texts too long": ("reasoning", "reasoning", "long", ("the tokenizer makes texts of 32 tokens (text_length) from "
                                                         "the test split of")),
}


def _arguments(dirs: dict, case: str) -> tuple[list[str], str]:
    model, task, data, expected = BAD[case]
    named = [] if data is None else ["--data", str(dirs[data]) if data in dirs else str(data)]
    return [str(dirs[model]), "--task", task, *named], expected


@pytest.mark.parametrize("case", list(BAD))
def test_a_task_the_model_cannot_run_or_data_in_another_format_is_one_line(dirs, tmp_path, capsys, case):
    (model, *rest), expected = _arguments(dirs, case)
    out = tmp_path / "o"
    assert main(["prune", "--model", model, *rest, "--out", str(out), *TINY]) == 1
    assert expected in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "o.ckpt").exists()
    assert main(["eval", model, *rest]) == 1
    assert expected in one_error_line(capsys.readouterr().err)
