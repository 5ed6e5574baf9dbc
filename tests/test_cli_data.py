"""``--data DIR``: `comp-vlm prune` and `eval` of a CLIP model directory on a COCO/Flickr30K directory in Karpathy's
format (the COCO-layout fixture), and the one-line errors of bad data and model directories."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_clip
from test_cli import one_error_line, run_cli

import comp_vlm
from comp_vlm import demo
from comp_vlm.cli import main
from comp_vlm.data.karpathy import caption_vocabulary, karpathy_batches, read_karpathy
from comp_vlm.data.processor import make_image_processor
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.loading import load_dense_dir
from comp_vlm.tasks.retrieval import RetrievalTask

COCO = Path(__file__).parent / "fixtures" / "coco_karpathy"
COCO_JSON = (COCO / "dataset_coco.json").resolve()
TINY = ["--ratio", "0.3", "--flops-step", "0.3", "--stage-steps", "2", "--finetune-steps", "1",
        "--calibration-batches", "1", "--batch-size", "4"]


def processor(size: int = 16):
    return make_image_processor(size, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(caption_vocabulary([c for im in read_karpathy(COCO, check_images=False)
                                                    for c in im.captions]))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny dense CLIP (random weights) with a tokenizer of the fixture's words and a 16-px image processor."""
    model = make_clip(vocab=len(tokenizer), eos_token_id=tokenizer.eos_token_id, image_size=16, patch=4)
    return demo.save_dense_dir(model, tmp_path_factory.mktemp("clip") / "dense", tokenizer, processor())


def test_prune_and_eval_on_a_karpathy_directory(clip_dir, tokenizer, tmp_path, capsys):
    out = tmp_path / "p"
    proc = run_cli("prune", "--model", str(clip_dir), "--data", str(COCO), "--out", str(out), "-q", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert "pruned model:" in proc.stdout and "Traceback" not in proc.stderr
    report = json.loads((out / "report.json").read_text())
    data = report["data"]
    assert {k: data[k] for k in ("kind", "dir", "json")} == {"kind": "karpathy", "dir": str(COCO.resolve()),
                                                              "json": str(COCO_JSON)}
    assert (data["n_train"], data["n_val"], data["n_test"]) == (15, 5, 10)  # train + restval, val, test captions
    train = [c for im in read_karpathy(COCO, ("train", "restval")) for c in im.captions]
    lengths = [len(ids) for ids in tokenizer(train)["input_ids"]]
    assert report["reference"]["text_length"] == round(sum(lengths) / len(lengths))
    assert comp_vlm.read_recipe(out).extra["data"]["json"] == str(COCO_JSON)
    # the reported dense metrics are those of the test split
    test = karpathy_batches(COCO, "test", tokenizer, processor(), batch_size=64)
    dense = RetrievalTask().evaluate(load_dense_dir(clip_dir), test)
    assert report["dense"]["metrics"]["r1_mean"] == pytest.approx(dense["r1_mean"])

    path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", str(COCO), "--json", str(path), "-q"]) == 0
    text = capsys.readouterr().out
    assert "dataset_coco.json test split: 10 captions of 2 images" in text and "r1_mean" in text
    result = json.loads(path.read_text())
    assert result["data"]["kind"] == "karpathy" and result["data"]["json"] == str(COCO_JSON) and result["n"] == 10
    assert result["metrics"]["r1_mean"] == pytest.approx(report["snapshots"]["0.30"]["metrics"]["r1_mean"])
    assert result["flops_kept"] <= 0.7 + 1e-9
    # without --data: the data recorded with the pruned model
    assert main(["eval", str(out)]) == 0
    captured = capsys.readouterr()  # the progress line on stderr, the results on stdout
    assert "as recorded with the model" in captured.err and "10 captions of 2 images" in captured.out
    # other data: none of the recorded settings (split sizes, gallery) carry over
    assert main(["eval", str(out), "--data", "synthetic", "-q"]) == 0
    assert "synthetic test split: 512 pairs (galleries of 100)" in capsys.readouterr().out


def test_eval_a_dense_model_directory_on_a_karpathy_directory(clip_dir, capsys):
    assert main(["eval", str(clip_dir), "--data", str(COCO), "-q"]) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "10 captions of 2 images" in text and "r1_mean" in text


def _copy_data(tmp_path: Path, edit) -> Path:
    data = tmp_path / "coco"
    shutil.copytree(COCO, data)
    edit(data)
    return data


def _drop_val_split(data: Path) -> None:
    document = json.loads((data / "dataset_coco.json").read_text())
    for image in document["images"]:
        image["split"] = "train" if image["split"] == "val" else image["split"]
    (data / "dataset_coco.json").write_text(json.dumps(document))


def _copy_model(tmp_path: Path, clip_dir: Path, drop: tuple[str, ...] = (), image_size: int | None = None) -> Path:
    model = tmp_path / "model"
    shutil.copytree(clip_dir, model)
    for name in drop:
        (model / name).unlink()
    if image_size is not None:
        processor(image_size).save_pretrained(str(model))
    return model


BAD = {  # name: (model, data, extra arguments) -> what the one error line names
    "no Karpathy JSON": (lambda t, m: (m, _copy_data(t, lambda d: (d / "dataset_coco.json").unlink()), []),
                         "no dataset_*.json"),
    "missing image": (lambda t, m: (m, _copy_data(t, lambda d: (d / "val2014" / "COCO_val2014_000000000139.jpg")
                                                  .unlink()), []), "missing image"),
    "empty split": (lambda t, m: (m, _copy_data(t, _drop_val_split), []), "split 'val' has no images"),
    "no tokenizer": (lambda t, m: (_copy_model(t, m, ("tokenizer.json", "tokenizer_config.json")), COCO, []),
                     "holds no tokenizer"),
    "no image processor": (lambda t, m: (_copy_model(t, m, ("preprocessor_config.json",)), COCO, []),
                           "holds no image processor"),
    "image size": (lambda t, m: (_copy_model(t, m, image_size=8), COCO, []), "makes 8x8 images"),
    "built-in model": (lambda t, m: ("demo-clip-quick", COCO, []), "needs --model DIR"),
    "batch size": (lambda t, m: (m, COCO, ["--batch-size", "16"]), "exceeds the 15 training pairs"),
    "synthetic sizes": (lambda t, m: (m, COCO, ["--n-train", "8"]), "--n-train"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_or_model_is_one_line(clip_dir, tmp_path, capsys, case):
    make, expected = BAD[case]
    model, data, extra = make(tmp_path, clip_dir)
    out = tmp_path / "o"
    assert main(["prune", "--model", str(model), "--data", str(data), "--out", str(out), *TINY, *extra]) == 1
    assert expected in one_error_line(capsys.readouterr().err)
    assert not out.exists() and not (tmp_path / "o.ckpt").exists()


@pytest.mark.parametrize("case", ["no Karpathy JSON", "missing image", "no tokenizer", "no image processor",
                                  "image size"])
def test_eval_bad_data_or_model_is_one_line(clip_dir, tmp_path, capsys, case):
    make, expected = BAD[case]
    model, data, _ = make(tmp_path, clip_dir)
    assert main(["eval", str(model), "--data", str(data)]) == 1
    assert expected in one_error_line(capsys.readouterr().err)


def test_a_model_directory_without_a_tokenizer_is_refused_for_synthetic_data_too(clip_dir, tmp_path, capsys):
    """transformers would build an empty tokenizer for it, and every caption would become unknown tokens."""
    model = _copy_model(tmp_path, clip_dir, ("tokenizer.json", "tokenizer_config.json"))
    assert main(["prune", "--model", str(model), "--data", "synthetic", "--out", str(tmp_path / "o"), "--n-train",
                 "64", *TINY]) == 1
    assert "holds no tokenizer" in one_error_line(capsys.readouterr().err)
    assert main(["eval", str(model), "--data", "synthetic"]) == 1
    assert "holds no tokenizer" in one_error_line(capsys.readouterr().err)
