"""NLVR2: a statement about a pair of images and whether it is true, as released by lil-lab/nlvr.

A split is a JSON-lines file ``data/{train,dev,test1,test2}.json``; each line has ``sentence``, ``label`` (the
string ``"True"`` or ``"False"``), ``identifier`` (``split-set_id-pair_id-sentence_id``), ``left_url``,
``right_url`` and more (``writer``, ``synset``, ``query``, ``validation``, ...); training lines also have
``directory``, the numbered sub-folder of their images. The images of an example are named
``split-set_id-pair_id-img0.png`` (left) and ``...-img1.png`` (right) and live in ``images/<split>/[<directory>/]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import DataError
from .files import PathLike, check_split, existing_image, get_field, read_jsonl, require_nonempty, write_jsonl

NLVR2_SPLITS = ("train", "dev", "test1", "test2")
_OWN_FIELDS = ("sentence", "label", "identifier", "directory")
_LABELS = {"true": True, "false": False}


@dataclass(frozen=True)
class NLVR2Example:
    """One statement about a pair of images. ``left``/``right`` are the resolved image files (``None`` when the
    reader was told not to look); ``extra`` holds the line's other fields (URLs, writer, validations)."""

    identifier: str
    sentence: str
    label: bool
    directory: int | None = None
    left: Path | None = None
    right: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def image_names(self) -> tuple[str, str]:
        """File names of the left and right images."""
        return image_names(self.identifier)


def image_names(identifier: str, where: str = "identifier") -> tuple[str, str]:
    """``("split-set-pair-img0.png", "split-set-pair-img1.png")`` for ``split-set-pair-sentence``."""
    parts = identifier.split("-")
    if len(parts) < 4 or not all(p.isdigit() for p in parts[-3:]):
        raise DataError(f"{where}: identifier {identifier!r} is not split-set_id-pair_id-sentence_id")
    pair = "-".join(parts[:-1])
    return f"{pair}-img0.png", f"{pair}-img1.png"


def _label(entry: dict, where: str) -> bool:
    value = get_field(entry, "label", (str, bool), where)
    if isinstance(value, bool):
        return value
    if value.lower() not in _LABELS:
        raise DataError(f"{where}: label must be 'True' or 'False', got {value!r}")
    return _LABELS[value.lower()]


def _parse(entry: Any, where: str) -> NLVR2Example:
    sentence = get_field(entry, "sentence", str, where)
    identifier = get_field(entry, "identifier", str, where)
    image_names(identifier, where)
    directory = get_field(entry, "directory", (int, str), where) if "directory" in entry else None
    if isinstance(directory, str):
        if not directory.isdigit():
            raise DataError(f"{where}: directory must be a number, got {directory!r}")
        directory = int(directory)
    extra = {k: v for k, v in entry.items() if k not in _OWN_FIELDS}
    return NLVR2Example(identifier, sentence, _label(entry, where), directory, extra=extra)


def read_nlvr2(path: PathLike, image_dir: PathLike | None = None, check_images: bool = True,
               ) -> list[NLVR2Example]:
    """The examples of one NLVR2 JSON-lines file; with ``check_images`` both images of every example must exist
    under ``image_dir`` (in the ``directory`` sub-folder when the line names one)."""
    path = Path(path)
    if check_images and image_dir is None:
        raise DataError(f"{path}: an image folder is needed to check the images")
    examples, seen = [], {}
    for number, entry in enumerate(read_jsonl(path), 1):
        where = f"{path}: line {number}"
        ex = _parse(entry, where)
        if ex.identifier in seen:
            raise DataError(f"{where}: identifier {ex.identifier!r} repeats line {seen[ex.identifier]}")
        seen[ex.identifier] = number
        if check_images:
            folder = Path(image_dir) / (str(ex.directory) if ex.directory is not None else "")
            left, right = (existing_image([folder / name], where) for name in ex.image_names)
            ex = replace(ex, left=left, right=right)
        examples.append(ex)
    return list(require_nonempty(examples, path, None, "examples"))


def split_file(root: PathLike, split: str) -> Path:
    """``root/data/<split>.json`` (or ``root/<split>.json``), the file of an NLVR2 split."""
    root = Path(root)
    check_split(split, NLVR2_SPLITS, str(root))
    candidates = [root / "data" / f"{split}.json", root / f"{split}.json"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"{root}: split {split!r} has no file ({candidates[0]} or {candidates[1]})")


def read_nlvr2_split(root: PathLike, split: str, image_dir: PathLike | None = None, check_images: bool = True,
                     ) -> list[NLVR2Example]:
    """One split of an NLVR2 folder laid out as released: ``data/<split>.json`` and ``images/<split>/``."""
    return read_nlvr2(split_file(root, split), image_dir if image_dir is not None else Path(root) / "images" / split,
                      check_images)


def write_nlvr2(path: PathLike, examples: Sequence[NLVR2Example]) -> None:
    """Write ``examples`` as NLVR2 JSON lines (labels as ``"True"``/``"False"``)."""
    rows = []
    for ex in examples:
        row: dict[str, Any] = {"sentence": ex.sentence, "label": str(ex.label), "identifier": ex.identifier}
        if ex.directory is not None:
            row["directory"] = ex.directory
        rows.append({**row, **ex.extra})
    write_jsonl(path, rows)


__all__ = ["NLVR2_SPLITS", "NLVR2Example", "image_names", "read_nlvr2", "read_nlvr2_split", "split_file",
           "write_nlvr2"]
