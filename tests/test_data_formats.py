"""Readers and writers of the real dataset formats (Karpathy COCO/Flickr30K JSON, NLVR2 JSON lines, VQAv2 JSON) on
fixtures in the exact released layout: what they read, round trips through the writers, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from comp_vlm.data.karpathy import (
    CaptionedImage,
    caption_tokens,
    caption_vocabulary,
    find_karpathy_json,
    read_karpathy,
    write_karpathy,
)
from comp_vlm.data.nlvr2 import image_names, read_nlvr2, read_nlvr2_split, write_nlvr2
from comp_vlm.data.vqav2 import find_vqav2_files, read_vqav2, read_vqav2_split, write_vqav2
from comp_vlm.errors import CompVLMError, DataError

FIXTURES = Path(__file__).parent / "fixtures"
COCO = FIXTURES / "coco_karpathy"
FLICKR = FIXTURES / "flickr30k_karpathy"
NLVR2 = FIXTURES / "nlvr2"
VQA = FIXTURES / "vqav2"


def copy_fixture(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def test_data_error_is_a_comp_vlm_error():
    assert issubclass(DataError, CompVLMError) and issubclass(DataError, ValueError)


# -- Karpathy --------------------------------------------------------------------------------------------------
def test_coco_karpathy_fixture_reads_every_image_with_its_folder_and_captions():
    images = read_karpathy(COCO)
    assert [im.split for im in images] == ["test", "test", "val", "train", "train", "restval"]
    first = images[0]
    assert first.filename == "COCO_val2014_000000000139.jpg" and first.filepath == "val2014"
    assert first.path == COCO / "val2014" / "COCO_val2014_000000000139.jpg"
    assert images[3].path == COCO / "train2014" / "COCO_train2014_000000000009.jpg"
    assert len(first.captions) == 5 and first.captions[2] == "a square that is red "  # raw, untouched
    assert [im.image_id for im in images] == list(range(6))
    assert first.extra == {"cocoid": 139}


def test_karpathy_split_selection_keeps_file_order():
    train = read_karpathy(COCO / "dataset_coco.json", splits=("train", "restval"))
    assert [im.filename for im in train] == ["COCO_train2014_000000000009.jpg", "COCO_train2014_000000000025.jpg",
                                             "COCO_val2014_000000000724.jpg"]
    assert [im.image_id for im in read_karpathy(COCO, "test")] == [0, 1]


def test_flickr_karpathy_fixture_finds_images_in_the_unpacked_folder():
    images = read_karpathy(FLICKR)
    assert [im.split for im in images] == ["train", "val", "test"]
    assert all(im.filepath is None for im in images)
    assert images[2].path == FLICKR / "flickr30k-images" / "1000268201.jpg"


@pytest.mark.parametrize("folder", [COCO, FLICKR])
def test_karpathy_writer_reproduces_the_fixture_file(folder, tmp_path):
    source = find_karpathy_json(folder)
    document = json.loads(source.read_text())
    out = tmp_path / source.name
    write_karpathy(out, read_karpathy(folder, check_images=False), document["dataset"])
    assert json.loads(out.read_text()) == document  # every field and value, tokens and sentids included
    assert read_karpathy(out, check_images=False) == read_karpathy(folder, check_images=False)


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    write_karpathy(tmp_path / "dataset_x.json", [CaptionedImage("a.png", "test", ("a cat",), 0)], "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "dataset_x.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_karpathy_tokens_and_vocabulary():
    assert caption_tokens("Yellow ground, green sky ") == ["yellow", "ground", "green", "sky"]
    assert caption_vocabulary(["A t-rex, and Mrs. Claus"]) == [",", "-", ".", "a", "and", "claus", "mrs", "rex", "t"]


def test_karpathy_round_trip_of_new_items(tmp_path):
    images = [CaptionedImage("a.png", "train", ("one cat", "a cat"), 7, "images", extra={"objects": [1, 2]}),
              CaptionedImage("b.png", "test", ("two dogs",), 9, None)]
    write_karpathy(tmp_path / "dataset_x.json", images, "x")
    assert read_karpathy(tmp_path, check_images=False) == images


def test_karpathy_wrong_split_name():
    with pytest.raises(DataError, match=r"dataset_coco\.json: unknown split 'valid' \(expected one of train"):
        read_karpathy(COCO, splits="valid")


def test_karpathy_empty_split(tmp_path):
    folder = copy_fixture(FLICKR, tmp_path)
    edit_json(folder / "dataset_flickr30k.json", lambda d: d["images"].pop(2))
    with pytest.raises(DataError, match=r"dataset_flickr30k\.json: split 'test' has no images"):
        read_karpathy(folder, splits="test")


def test_karpathy_missing_image_names_the_entry_and_the_path(tmp_path):
    folder = copy_fixture(COCO, tmp_path)
    (folder / "val2014" / "COCO_val2014_000000000285.jpg").unlink()
    with pytest.raises(DataError, match=r"dataset_coco\.json: images\[1\]: missing image .*val2014/"
                                        r"COCO_val2014_000000000285\.jpg"):
        read_karpathy(folder)
    assert len(read_karpathy(folder, splits="val")) == 1  # images outside the selection are not looked for


def test_karpathy_malformed_json(tmp_path):
    path = tmp_path / "dataset_coco.json"
    path.write_text(COCO.joinpath("dataset_coco.json").read_text()[:500])
    with pytest.raises(DataError, match=r"dataset_coco\.json: malformed JSON at line 1 column \d+"):
        read_karpathy(path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["images"][3].update(split="validation"), r"images\[3\]: unknown split 'validation'"),
    (lambda d: d["images"][1].pop("filename"), r"images\[1\]: missing field 'filename'"),
    (lambda d: d["images"][2].update(sentences=[]), r"images\[2\]: no sentences"),
    (lambda d: d["images"][0]["sentences"][3].update(raw=5), r"images\[0\]\.sentences\[3\]: field 'raw' must be a str"),
    (lambda d: d["images"][4].update(imgid=1), r"images\[4\]: imgid 1 repeats images\[1\]"),
    (lambda d: d.pop("images"), r"dataset_coco\.json: missing field 'images'"),
])
def test_karpathy_bad_entries_name_the_entry(tmp_path, change, message):
    folder = copy_fixture(COCO, tmp_path)
    edit_json(folder / "dataset_coco.json", change)
    with pytest.raises(DataError, match=message):
        read_karpathy(folder)


def test_karpathy_folder_needs_exactly_one_file(tmp_path):
    with pytest.raises(DataError, match="no dataset_"):
        find_karpathy_json(tmp_path)
    (tmp_path / "dataset_a.json").write_text("{}")
    (tmp_path / "dataset_b.json").write_text("{}")
    with pytest.raises(DataError, match="several dataset_"):
        find_karpathy_json(tmp_path)


# -- NLVR2 -----------------------------------------------------------------------------------------------------
def test_nlvr2_fixture_reads_labels_and_both_images():
    train = read_nlvr2_split(NLVR2, "train")
    assert [(ex.identifier, ex.label, ex.directory) for ex in train] == [("train-612-0-0", True, 12),
                                                                       ("train-1040-3-1", False, 40)]
    assert train[1].left == NLVR2 / "images/train/40/train-1040-3-img0.png"
    assert train[1].right == NLVR2 / "images/train/40/train-1040-3-img1.png"
    assert train[0].sentence == "The left image contains a red square."
    assert train[0].extra["writer"] == "12" and train[0].extra["validation"] == {"12": "True"}
    dev = read_nlvr2_split(NLVR2, "dev")
    assert dev[0].directory is None and dev[0].left == NLVR2 / "images/dev/dev-850-0-img0.png"
    assert dev[0].right == dev[1].right  # two statements about one pair


def test_nlvr2_image_names():
    assert image_names("test1-10-2-1") == ("test1-10-2-img0.png", "test1-10-2-img1.png")
    with pytest.raises(DataError, match="identifier 'dev-1-x-0' is not split-set_id-pair_id-sentence_id"):
        image_names("dev-1-x-0")


@pytest.mark.parametrize("split", ["train", "dev"])
def test_nlvr2_writer_reproduces_the_fixture_lines(split, tmp_path):
    source = NLVR2 / "data" / f"{split}.json"
    out = tmp_path / f"{split}.json"
    write_nlvr2(out, read_nlvr2(source, check_images=False))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert lines == [json.loads(x) for x in source.read_text().splitlines()]
    assert read_nlvr2(out, check_images=False) == read_nlvr2(source, check_images=False)


def test_nlvr2_wrong_split_name_and_missing_split():
    with pytest.raises(DataError, match="unknown split 'validation' \\(expected one of train, dev, test1, test2\\)"):
        read_nlvr2_split(NLVR2, "validation")
    with pytest.raises(DataError, match="split 'test1' has no file"):
        read_nlvr2_split(NLVR2, "test1")


def test_nlvr2_empty_split(tmp_path):
    (tmp_path / "dev.json").write_text("\n")
    with pytest.raises(DataError, match=r"dev\.json: no examples"):
        read_nlvr2(tmp_path / "dev.json", check_images=False)


def test_nlvr2_missing_image_names_the_line(tmp_path):
    folder = copy_fixture(NLVR2, tmp_path)
    (folder / "images/train/40/train-1040-3-img1.png").unlink()
    with pytest.raises(DataError, match=r"train\.json: line 2: missing image .*train-1040-3-img1\.png"):
        read_nlvr2_split(folder, "train")


@pytest.mark.parametrize("line, message", [
    ('{"sentence": "x", "label": "yes", "identifier": "dev-1-0-0"}', r"line 2: label must be 'True' or 'False'"),
    ('{"sentence": "x", "label": "True"}', r"line 2: missing field 'identifier'"),
    ('{"sentence": "x", "label": "True", "identifier": "dev-850-0-0"}', r"line 2: identifier 'dev-850-0-0' repeats"),
    ('{"sentence": "x", "label": "True", "identifier": "dev-1-0-0", "directory": "a"}', "line 2: directory must"),
    ('{"sentence": "x", "label": "True", ', r"line 2: malformed JSON"),
])
def test_nlvr2_bad_lines_name_the_line(tmp_path, line, message):
    path = tmp_path / "dev.json"
    path.write_text((NLVR2 / "data/dev.json").read_text().splitlines()[0] + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        read_nlvr2(path, check_images=False)


# -- VQAv2 -----------------------------------------------------------------------------------------------------
def test_vqav2_fixture_joins_questions_answers_and_images():
    questions = read_vqav2_split(VQA, "val2014")
    assert [q.question_id for q in questions] == [42000, 42001, 73000]
    q = questions[0]
    assert q.question == "What color is the square?" and q.image_id == 42
    assert q.answers == ("red",) * 5 + ("dark red", "red", "maroon", "red", "red")
    assert (q.multiple_choice_answer, q.question_type, q.answer_type) == ("red", "what color is the", "other")
    assert q.image == VQA / "val2014" / "COCO_val2014_000000000042.jpg"
    assert questions[2].image == VQA / "val2014" / "COCO_val2014_000000000073.jpg"


def test_vqav2_test_subtype_has_questions_only():
    assert find_vqav2_files(VQA, "test-dev2015")[1] is None
    (q,) = read_vqav2_split(VQA, "test-dev2015", image_dir=VQA / "test2015")
    assert q.answers == () and q.multiple_choice_answer is None
    assert q.image == VQA / "test2015" / "COCO_test2015_000000000001.jpg"


def test_vqav2_round_trip(tmp_path):
    questions = read_vqav2_split(VQA, "val2014", check_images=False)
    qpath, apath = write_vqav2(tmp_path, "val2014", questions, "mscoco")
    assert qpath.name == "v2_OpenEnded_mscoco_val2014_questions.json"
    assert apath.name == "v2_mscoco_val2014_annotations.json"
    assert read_vqav2_split(tmp_path, "val2014", check_images=False) == questions
    assert json.loads(qpath.read_text())["questions"] == json.loads((VQA / qpath.name).read_text())["questions"]
    assert annotations_without_confidence(apath) == annotations_without_confidence(VQA / apath.name)


def annotations_without_confidence(path: Path) -> list[dict]:
    """The annotations of a VQAv2 file without ``answer_confidence`` (which the reader does not keep)."""
    annotations = json.loads(path.read_text())["annotations"]
    for entry in annotations:
        for answer in entry["answers"]:
            del answer["answer_confidence"]
    return annotations


def test_vqav2_unknown_subtype_lists_the_ones_found():
    with pytest.raises(DataError, match=r"no questions file for subtype 'val2017' \(subtypes found: test-dev2015, "
                                        r"val2014\)"):
        read_vqav2_split(VQA, "val2017")


def test_vqav2_missing_image_names_the_question(tmp_path):
    folder = copy_fixture(VQA, tmp_path)
    (folder / "val2014" / "COCO_val2014_000000000073.jpg").unlink()
    with pytest.raises(DataError, match=r"questions\.json: question_id 73000: missing image of image_id 73"):
        read_vqav2_split(folder, "val2014")


@pytest.mark.parametrize("target, change, message", [
    ("annotations", lambda d: d["annotations"].pop(1), r"question_id 42001 has no annotation"),
    ("annotations", lambda d: d["annotations"][1].update(question_id=5), r"annotations\[1\]: question_id 5 is not in"),
    ("annotations", lambda d: d["annotations"][0].update(answers=[]), r"annotations\[0\]: no answers"),
    ("annotations", lambda d: d["annotations"][2].update(image_id=42), r"annotations\[2\]: image_id 42 differs"),
    ("questions", lambda d: d["questions"][1].update(question_id=42000), r"questions\[1\]: question_id 42000 repeats"),
    ("questions", lambda d: d["questions"].clear(), r"questions\.json: no questions"),
    ("questions", lambda d: d["questions"][0].pop("question"), r"questions\[0\]: missing field 'question'"),
])
def test_vqav2_bad_entries_name_the_file_and_entry(tmp_path, target, change, message):
    folder = copy_fixture(VQA, tmp_path)
    name = {"questions": "v2_OpenEnded_mscoco_val2014_questions.json",
            "annotations": "v2_mscoco_val2014_annotations.json"}[target]
    edit_json(folder / name, change)
    with pytest.raises(DataError, match=message):
        read_vqav2_split(folder, "val2014")


def test_vqav2_malformed_json(tmp_path):
    folder = copy_fixture(VQA, tmp_path)
    path = folder / "v2_mscoco_val2014_annotations.json"
    path.write_text(path.read_text().replace('"answers": [', '"answers": [[', 1))
    with pytest.raises(DataError, match=r"v2_mscoco_val2014_annotations\.json: malformed JSON at line 1"):
        read_vqav2(folder / "v2_OpenEnded_mscoco_val2014_questions.json", path, check_images=False)


def test_readers_keep_paths_relative_to_the_given_root(tmp_path):
    # the same fixture, moved: image paths follow the folder the reader was given
    folder = copy_fixture(COCO, tmp_path)
    moved = [im.path for im in read_karpathy(folder)]
    assert all(p.is_relative_to(folder) for p in moved)
    assert [p.relative_to(folder) for p in moved] == [im.path.relative_to(COCO) for im in read_karpathy(COCO)]
