"""COCO and Flickr30K captions in Karpathy's JSON format, and the retrieval batches built from them.

The file (``dataset_coco.json``, ``dataset_flickr30k.json``, ...) is one object ``{"images": [...], "dataset":
NAME}``. Each image has ``filename``, ``split`` (``train``, ``restval``, ``val`` or ``test``), ``sentences`` (each with
``raw`` -- the caption -- and ``tokens``, ``imgid``, ``sentid``), ``imgid`` and ``sentids``; COCO adds ``filepath``
(the image's folder, e.g. ``val2014``) and ``cocoid``. An empty or whitespace-only ``raw`` caption is refused
(:class:`DataError` naming the file and the entry). The image is ``IMAGE_ROOT/filepath/filename``; without a
``filepath`` it is ``IMAGE_ROOT/filename`` or ``IMAGE_ROOT/<dataset>-images/filename`` (how Flickr30K unpacks).
``IMAGE_ROOT`` defaults to the JSON file's folder.

:func:`karpathy_loaders` turns such a folder, a tokenizer and an image processor into the batches
:class:`~comp_vlm.tasks.retrieval.RetrievalTask` consumes: dicts with ``pixel_values`` ``(B, 3, H, W)``,
``input_ids`` and ``attention_mask`` ``(B, L)``, ``captions`` and ``image_ids`` -- one pair per sentence, so the
five captions of a COCO image are five pairs sharing an image id (the task counts them as one gallery image).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from .files import (
    PathLike,
    check_split,
    existing_image,
    get_field,
    process_images,
    read_json,
    require_nonempty,
    write_json,
)
from .synthetic import RetrievalLoaders, ShuffledBatches, fixed_batches, mix_seed

KARPATHY_SPLITS = ("train", "restval", "val", "test")
#: the fields this module reads or writes itself; any other per-image field is kept in ``CaptionedImage.extra``
_OWN_FIELDS = ("filepath", "sentids", "filename", "imgid", "split", "sentences")


@dataclass(frozen=True)
class CaptionedImage:
    """One image of a Karpathy file and its captions. ``path`` is the resolved image file (``None`` when the reader
    was told not to look); ``extra`` holds the file's other fields for this image (``cocoid``, annotations)."""

    filename: str
    split: str
    captions: tuple[str, ...]
    image_id: int
    filepath: str | None = None
    path: Path | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


def caption_tokens(raw: str) -> list[str]:
    """Karpathy-style ``tokens`` of a caption: lower-case words, punctuation dropped."""
    return re.findall(r"[^\W_]+", raw.lower())


def caption_vocabulary(texts: Sequence[str]) -> list[str]:
    """Every word of ``texts`` as :func:`comp_vlm.data.text.build_word_tokenizer` splits them (lower case, whitespace
    and punctuation runs), sorted: the vocabulary of a word-level tokenizer for these captions."""
    from tokenizers.pre_tokenizers import Whitespace

    split = Whitespace()
    return sorted({w for t in texts for w, _ in split.pre_tokenize_str(t.lower())})


def find_karpathy_json(source: PathLike) -> Path:
    """``source`` if it is a file, else the one ``dataset_*.json`` in the folder ``source``."""
    source = Path(source)
    if source.is_file():
        return source
    if not source.is_dir():
        raise DataError(f"{source}: no such file or folder")
    found = sorted(source.glob("dataset_*.json"))
    if len(found) != 1:
        what = "no dataset_*.json" if not found else f"several dataset_*.json ({', '.join(p.name for p in found)})"
        raise DataError(f"{source}: {what}; pass the Karpathy JSON file itself")
    return found[0]


def _image_candidates(root: Path, filename: str, filepath: str | None, dataset: str | None) -> list[Path]:
    if filepath is not None:
        return [root / filepath / filename]
    return [root / filename] + ([root / f"{dataset}-images" / filename] if dataset else [])


def _caption(sentence: Any, where: str) -> str:
    """A sentence's ``raw`` caption; an empty or whitespace-only one is a :class:`DataError` (it would train and
    count as a pair that says nothing)."""
    raw = get_field(sentence, "raw", str, where)
    if not raw.strip():
        raise DataError(f"{where}: empty caption (raw {raw!r}); remove the sentence or give it text")
    return raw


def _parse_image(entry: Any, index: int, where: str) -> CaptionedImage:
    filename = get_field(entry, "filename", str, where)
    split = check_split(get_field(entry, "split", str, where), KARPATHY_SPLITS, where)
    sentences = get_field(entry, "sentences", list, where)
    if not sentences:
        raise DataError(f"{where}: no sentences")
    captions = tuple(_caption(s, f"{where}.sentences[{j}]") for j, s in enumerate(sentences))
    image_id = get_field(entry, "imgid", int, where) if "imgid" in entry else index
    filepath = get_field(entry, "filepath", str, where) if "filepath" in entry else None
    extra = {k: v for k, v in entry.items() if k not in _OWN_FIELDS}
    return CaptionedImage(filename, split, captions, image_id, filepath, None, extra)


def read_karpathy(source: PathLike, splits: str | Sequence[str] | None = None, image_root: PathLike | None = None,
                  check_images: bool = True) -> list[CaptionedImage]:
    """The images of a Karpathy JSON file (or of the folder holding one) in file order, restricted to ``splits``
    (default: all). Every entry is checked; with ``check_images`` each selected image must exist (its ``path`` is
    set). A split name outside :data:`KARPATHY_SPLITS` or a selection without images is a :class:`DataError`."""
    path = find_karpathy_json(source)
    wanted = None if splits is None else ((splits,) if isinstance(splits, str) else tuple(splits))
    for s in wanted or ():
        check_split(s, KARPATHY_SPLITS, str(path))
    document = read_json(path)
    entries = get_field(document, "images", list, str(path))
    dataset = document.get("dataset") if isinstance(document.get("dataset"), str) else None
    root = Path(image_root) if image_root is not None else path.parent
    images, ids = [], {}
    for i, entry in enumerate(entries):
        where = f"{path}: images[{i}]"
        image = _parse_image(entry, i, where)
        if image.image_id in ids:
            raise DataError(f"{where}: imgid {image.image_id} repeats images[{ids[image.image_id]}]")
        ids[image.image_id] = i
        if wanted is not None and image.split not in wanted:
            continue
        if check_images:
            found = existing_image(_image_candidates(root, image.filename, image.filepath, dataset), where)
            image = replace(image, path=found)
        images.append(image)
    return list(require_nonempty(images, path, "+".join(wanted) if wanted else None, "images"))


def write_karpathy(path: PathLike, images: Sequence[CaptionedImage], dataset: str) -> None:
    """Write ``images`` as a Karpathy JSON file (``imgid`` from each image, ``sentid`` numbered in file order)."""
    entries, sentid = [], 0
    for image in images:
        sentences = [{"tokens": caption_tokens(c), "raw": c, "imgid": image.image_id, "sentid": sentid + j}
                     for j, c in enumerate(image.captions)]
        entry: dict[str, Any] = {} if image.filepath is None else {"filepath": image.filepath}
        entry.update({"sentids": [s["sentid"] for s in sentences], "filename": image.filename,
                      "imgid": image.image_id, "split": image.split, "sentences": sentences, **image.extra})
        entries.append(entry)
        sentid += len(sentences)
    write_json(path, {"images": entries, "dataset": dataset})


class ImageTextPairs:
    """One (image, caption) pair per caption of ``images``; an image with several captions is loaded once.

    Images go through ``image_processor`` (a transformers image processor) either all at once (``preload``) or
    per batch; ``preload=None`` preloads when the processed images fit in ``max_preload_bytes``. Captions are
    tokenized once (padded to the longest, truncated to the tokenizer's ``model_max_length``). :meth:`batch` has
    the interface :class:`~comp_vlm.data.synthetic.ShuffledBatches` and ``fixed_batches`` use.
    """

    def __init__(self, images: Sequence[CaptionedImage], tokenizer: Any, image_processor: Any,
                 preload: bool | None = None, max_preload_bytes: int = 2 << 30, progress: bool = False) -> None:
        if not images:
            raise DataError("no images to pair")
        missing = [im.filename for im in images if im.path is None]
        if missing:
            raise DataError(f"image {missing[0]!r} has no resolved path (read it with check_images=True)")
        self.images, self.processor = list(images), image_processor
        self.captions = [c for im in self.images for c in im.captions]
        self.image_index = torch.tensor([i for i, im in enumerate(self.images) for _ in im.captions])
        self.image_ids = [self.images[i].image_id for i in self.image_index.tolist()]
        tok = tokenizer(self.captions, padding=True, truncation=True, return_tensors="pt")
        self.input_ids, self.attention_mask = tok["input_ids"].long(), tok["attention_mask"].long()
        self._pixels: torch.Tensor | None = None
        if preload is None:
            first = process_images([self.images[0].path], image_processor)
            preload = first.numel() * first.element_size() * len(self.images) <= max_preload_bytes
        if preload:
            self._pixels = process_images([im.path for im in self.images], image_processor, progress=progress)

    def __len__(self) -> int:
        return len(self.captions)

    def pixel_values(self, image_rows: torch.Tensor) -> torch.Tensor:
        """Processed images ``(len(image_rows), 3, H, W)`` for rows of :attr:`images`."""
        if self._pixels is not None:
            return self._pixels[image_rows]
        unique, inverse = torch.unique(image_rows, return_inverse=True)
        return process_images([self.images[i].path for i in unique.tolist()], self.processor)[inverse]

    def batch(self, index: torch.Tensor) -> dict[str, Any]:
        """The pairs ``index``; text columns that are padding in every row are dropped."""
        mask = self.attention_mask[index]
        cols = mask.any(0)
        rows = index.tolist()
        return {"pixel_values": self.pixel_values(self.image_index[index]),
                "input_ids": self.input_ids[index][:, cols], "attention_mask": mask[:, cols],
                "captions": [self.captions[i] for i in rows], "image_ids": [self.image_ids[i] for i in rows]}


def karpathy_loaders(source: PathLike, tokenizer: Any, image_processor: Any, batch_size: int, *,
                     eval_batch_size: int | None = None, seed: int = 0,
                     train_splits: Sequence[str] = ("train", "restval"), val_split: str = "val",
                     test_split: str = "test", image_root: PathLike | None = None, preload: bool | None = None,
                     progress: bool = True) -> RetrievalLoaders:
    """Train (shuffled and re-iterable, as :func:`~comp_vlm.data.synthetic.make_retrieval_loaders` gives), val and
    test (fixed lists of batches in file order) retrieval data from a Karpathy file or the folder holding one.
    ``train_splits`` are pooled (COCO's ``restval`` joins ``train`` when the file has it)."""
    images = read_karpathy(source, image_root=image_root)
    path = find_karpathy_json(source)

    def pairs(splits: Sequence[str]) -> ImageTextPairs:
        for s in splits:
            check_split(s, KARPATHY_SPLITS, str(path))
        chosen = [im for im in images if im.split in splits]
        require_nonempty(chosen, path, "+".join(splits), "images")
        return ImageTextPairs(chosen, tokenizer, image_processor, preload=preload, progress=progress)

    eval_bs = eval_batch_size or batch_size
    return RetrievalLoaders(
        train=ShuffledBatches(pairs(tuple(train_splits)), batch_size, seed=mix_seed(seed, "shuffle")),
        val=fixed_batches(pairs((val_split,)), eval_bs),  # type: ignore[arg-type]
        test=fixed_batches(pairs((test_split,)), eval_bs),  # type: ignore[arg-type]
    )


def karpathy_batches(source: PathLike, split: str, tokenizer: Any, image_processor: Any, batch_size: int, *,
                     image_root: PathLike | None = None, preload: bool | None = None,
                     progress: bool = False) -> list[dict[str, Any]]:
    """One split as a fixed list of retrieval batches in file order (for evaluation)."""
    images = read_karpathy(source, splits=split, image_root=image_root)
    pairs = ImageTextPairs(images, tokenizer, image_processor, preload=preload, progress=progress)
    return fixed_batches(pairs, batch_size)  # type: ignore[arg-type]


__all__ = ["KARPATHY_SPLITS", "CaptionedImage", "ImageTextPairs", "caption_tokens", "caption_vocabulary",
           "find_karpathy_json", "karpathy_batches", "karpathy_loaders", "read_karpathy", "write_karpathy"]
