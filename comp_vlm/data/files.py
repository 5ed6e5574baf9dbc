"""Reading and writing dataset files, shared by the format readers (Karpathy, NLVR2, VQAv2) and the emoji world.

Every failure is one line, a :class:`~comp_vlm.errors.DataError` naming the file and the entry (``"dataset.json:
images[3]: missing field 'filename'"``): missing or malformed files, missing fields, wrong split names, empty splits,
missing or unreadable images.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import DataError

PathLike = str | os.PathLike


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None


def read_json(path: PathLike) -> Any:
    """The JSON document in ``path``."""
    path = Path(path)
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg})") from None


def read_jsonl(path: PathLike) -> list[Any]:
    """One JSON document per non-blank line of ``path``."""
    path = Path(path)
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number}: malformed JSON at column {exc.colno} ({exc.msg})") from None
    return rows


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file; the file gets the usual
    permissions (``0o666`` less the umask), not the temporary file's private ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_json(path: PathLike, document: Any) -> None:
    _write_text(Path(path), json.dumps(document, ensure_ascii=False) + "\n")


def write_jsonl(path: PathLike, rows: Iterable[Any]) -> None:
    _write_text(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number",
               bool: "a boolean", type(None): "null"}


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def get_field(entry: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    """``entry[key]``, which must exist and be of ``kind`` (booleans never count as integers)."""
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {_json_type(entry)}")
    if key not in entry:
        raise DataError(f"{where}: missing field {key!r}")
    value = entry[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise DataError(f"{where}: field {key!r} must be {' or '.join(_JSON_TYPES.get(k, k.__name__) for k in kinds)}"
                        f", got {_json_type(value)}")
    return value


def check_split(split: str, allowed: Sequence[str], where: str) -> str:
    """``split`` if it is one of ``allowed``."""
    if split not in allowed:
        raise DataError(f"{where}: unknown split {split!r} (expected one of {', '.join(allowed)})")
    return split


def require_nonempty(items: Sequence[Any], source: PathLike, split: str | None, noun: str = "entries",
                     ) -> Sequence[Any]:
    """``items`` unless there are none (the error names ``split``, or the whole file when it is ``None``)."""
    if not items:
        raise DataError(f"{source}: " + (f"split {split!r} has no {noun}" if split else f"no {noun}"))
    return items


def existing_image(candidates: Sequence[Path], where: str) -> Path:
    """The first of ``candidates`` that is a file."""
    for path in candidates:
        if path.is_file():
            return path
    also = f" (nor {', '.join(map(str, candidates[1:]))})" if len(candidates) > 1 else ""
    raise DataError(f"{where}: missing image {candidates[0]}{also}")


def open_rgb(path: PathLike) -> Any:
    """The image at ``path`` as an RGB PIL image (fully read, file closed)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: missing image") from None
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from None


def process_images(paths: Sequence[PathLike], image_processor: Any, chunk: int = 256,
                   progress: bool = False) -> torch.Tensor:
    """``pixel_values`` ``(N, 3, H, W)`` of the images at ``paths`` through a transformers image processor."""
    parts = []
    for start in tqdm(range(0, len(paths), chunk), desc="images", disable=not progress or len(paths) <= chunk):
        images = [open_rgb(p) for p in paths[start:start + chunk]]
        parts.append(image_processor(images, return_tensors="pt")["pixel_values"].float())
    if not parts:
        raise DataError("no images to load")
    return torch.cat(parts)


__all__ = ["check_split", "existing_image", "get_field", "open_rgb", "process_images", "read_json", "read_jsonl",
           "require_nonempty", "write_json", "write_jsonl"]
