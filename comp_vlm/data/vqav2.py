"""VQAv2: open-ended questions about images with ten human answers each, in the official JSON files.

- Questions, ``v2_OpenEnded_<data_type>_<subtype>_questions.json``: ``{"info", "task_type": "Open-Ended",
  "data_type", "license", "data_subtype", "questions": [{"image_id", "question", "question_id"}, ...]}``.
- Annotations, ``v2_<data_type>_<subtype>_annotations.json`` (absent for test subtypes): ``{"info", "license",
  "data_subtype", "data_type", "annotations": [{"question_id", "image_id", "question_type", "answer_type",
  "multiple_choice_answer", "answers": [{"answer", "answer_confidence", "answer_id"}, ... ten]}, ...]}``.
- Images: ``<subtype>/COCO_<subtype>_<image_id:012d>.jpg`` next to the files; any image whose name ends in
  ``_<12-digit image id>`` is found, whatever its prefix and extension.

Accuracy (the official metric and answer normalisation) is in :mod:`comp_vlm.data.vqa_eval`.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import PathLike, get_field, read_json, require_nonempty, write_json

_IMAGE_NAME = re.compile(r"_(\d{12})\.[A-Za-z0-9]+$")
_QUESTIONS = re.compile(r"^v2_OpenEnded_(.+)_([^_]+)_questions\.json$")


@dataclass(frozen=True)
class VQAQuestion:
    """One question; the annotation fields are empty when the subtype has no annotation file. ``image`` is the
    resolved image file (``None`` when the reader was told not to look)."""

    question_id: int
    image_id: int
    question: str
    answers: tuple[str, ...] = ()
    multiple_choice_answer: str | None = None
    question_type: str | None = None
    answer_type: str | None = None
    image: Path | None = None


def image_file_name(subtype: str, image_id: int, prefix: str = "COCO", ext: str = "jpg") -> str:
    """``COCO_val2014_000000000042.jpg``: the official name of an image of ``subtype``."""
    return f"{prefix}_{subtype}_{image_id:012d}.{ext}"


def most_common_answer(answers: Sequence[str]) -> str:
    """The answer given most often (the first of those tied), VQAv2's ``multiple_choice_answer``."""
    return Counter(answers).most_common(1)[0][0]


def find_vqav2_files(root: PathLike, subtype: str) -> tuple[Path, Path | None]:
    """The questions file of ``subtype`` in ``root`` and its annotation file (``None`` when there is none)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    questions = sorted(root.glob(f"v2_OpenEnded_*_{subtype}_questions.json"))
    if len(questions) != 1:
        found = sorted({m.group(2) for p in root.glob("v2_OpenEnded_*_questions.json")
                        if (m := _QUESTIONS.match(p.name))})
        what = "no questions file" if not questions else "several questions files"
        raise DataError(f"{root}: {what} for subtype {subtype!r} (subtypes found: {', '.join(found) or 'none'})")
    annotations = sorted(root.glob(f"v2_*_{subtype}_annotations.json"))
    if len(annotations) > 1:
        raise DataError(f"{root}: several annotation files for subtype {subtype!r}")
    return questions[0], (annotations[0] if annotations else None)


def index_images(image_dir: PathLike) -> dict[int, Path]:
    """Image id -> file, for the files of ``image_dir`` named ``..._<12-digit id>.<ext>``."""
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: no such image folder")
    return {int(m.group(1)): p for p in image_dir.iterdir() if (m := _IMAGE_NAME.search(p.name))}


def _parse_question(entry: Any, where: str) -> VQAQuestion:
    return VQAQuestion(get_field(entry, "question_id", int, where), get_field(entry, "image_id", int, where),
                       get_field(entry, "question", str, where))


def _annotate(question: VQAQuestion, entry: Any, where: str) -> VQAQuestion:
    if get_field(entry, "image_id", int, where) != question.image_id:
        raise DataError(f"{where}: image_id {entry['image_id']} differs from its question's {question.image_id}")
    answers = get_field(entry, "answers", list, where)
    if not answers:
        raise DataError(f"{where}: no answers")
    texts = tuple(get_field(a, "answer", str, f"{where}.answers[{k}]") for k, a in enumerate(answers))
    return replace(question, answers=texts,
                   multiple_choice_answer=get_field(entry, "multiple_choice_answer", str, where),
                   question_type=get_field(entry, "question_type", str, where),
                   answer_type=get_field(entry, "answer_type", str, where))


def _by_question_id(entries: list, path: Path, kind: str, parse: Any) -> dict[int, Any]:
    out: dict[int, Any] = {}
    for i, entry in enumerate(entries):
        where = f"{path}: {kind}[{i}]"
        qid = get_field(entry, "question_id", int, where)
        if qid in out:
            raise DataError(f"{where}: question_id {qid} repeats")
        out[qid] = parse(entry, where)
    return out


def read_vqav2(questions_path: PathLike, annotations_path: PathLike | None = None,
               image_dir: PathLike | None = None, check_images: bool = True) -> list[VQAQuestion]:
    """The questions of one VQAv2 questions file in file order, with their annotations when ``annotations_path``
    is given (every question must have exactly one, and no annotation may lack its question); with
    ``check_images`` every question's image must be in ``image_dir``."""
    qpath = Path(questions_path)
    entries = get_field(read_json(qpath), "questions", list, str(qpath))
    questions = _by_question_id(entries, qpath, "questions", _parse_question)
    require_nonempty(list(questions), qpath, None, "questions")
    if annotations_path is not None:
        apath = Path(annotations_path)
        raw = get_field(read_json(apath), "annotations", list, str(apath))
        annotated = _by_question_id(raw, apath, "annotations", lambda e, w: (e, w))
        orphans = sorted(annotated.keys() - questions.keys())
        if orphans:
            raise DataError(f"{annotated[orphans[0]][1]}: question_id {orphans[0]} is not in {qpath}")
        for qid, q in questions.items():
            if qid not in annotated:
                raise DataError(f"{qpath}: question_id {qid} has no annotation in {apath}")
            questions[qid] = _annotate(q, *annotated[qid])
    if check_images:
        if image_dir is None:
            raise DataError(f"{qpath}: an image folder is needed to check the images")
        files = index_images(image_dir)
        for qid, q in questions.items():
            if q.image_id not in files:
                raise DataError(f"{qpath}: question_id {qid}: missing image of image_id {q.image_id} "
                                f"(no file named *_{q.image_id:012d}.* in {image_dir})")
            questions[qid] = replace(q, image=files[q.image_id])
    return list(questions.values())


def read_vqav2_split(root: PathLike, subtype: str, image_dir: PathLike | None = None,
                     check_images: bool = True) -> list[VQAQuestion]:
    """One subtype of a VQAv2 folder laid out as released: the two JSON files in ``root`` and the images in
    ``root/<subtype>`` (pass ``image_dir`` where they live elsewhere, e.g. ``test2015`` for ``test-dev2015``)."""
    questions, annotations = find_vqav2_files(root, subtype)
    return read_vqav2(questions, annotations, image_dir if image_dir is not None else Path(root) / subtype,
                      check_images)


def write_vqav2(root: PathLike, subtype: str, questions: Sequence[VQAQuestion], data_type: str = "mscoco",
                info: dict | None = None) -> tuple[Path, Path]:
    """Write the questions and annotation files of ``subtype`` into ``root``; returns their paths."""
    root = Path(root)
    head = {"info": info or {}, "license": {"name": "see the dataset's licence"}, "data_subtype": subtype,
            "data_type": data_type}
    qpath = root / f"v2_OpenEnded_{data_type}_{subtype}_questions.json"
    apath = root / f"v2_{data_type}_{subtype}_annotations.json"
    write_json(qpath, {**head, "task_type": "Open-Ended", "questions": [
        {"image_id": q.image_id, "question": q.question, "question_id": q.question_id} for q in questions]})
    write_json(apath, {**head, "annotations": [
        {"question_type": q.question_type, "multiple_choice_answer": q.multiple_choice_answer,
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(q.answers)],
         "image_id": q.image_id, "answer_type": q.answer_type, "question_id": q.question_id} for q in questions]})
    return qpath, apath


__all__ = ["VQAQuestion", "find_vqav2_files", "image_file_name", "index_images", "most_common_answer",
           "read_vqav2", "read_vqav2_split", "write_vqav2"]
