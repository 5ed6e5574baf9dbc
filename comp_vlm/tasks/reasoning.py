"""NLVR2-style reasoning: is a statement about a pair of images true? (registered as ``reasoning``)

The project's adaptation. The paper's BLIP-NLVR2 model encodes the two images separately and reads them through two
cross-attentions per text layer; transformers has no such class. Concatenating the two images' tokens into one
cross-attention memory cannot work: cross-attention is invariant to the order of its memory and both images carry
the same position embeddings, so swapping left and right gives identical logits (tests/test_blip_tasks.py checks
it). Instead the two images go *side by side* into one image of width 2W (left | right), which
``BlipForImageTextRetrieval`` encodes with ``interpolate_pos_encoding=True``; its ITM head reads the statement
against it: class 1 true, class 0 false. Loss: cross-entropy on the head's two logits; metric: ``accuracy`` (percent).

Batches (from :class:`ReasoningCollator`): ``pixel_values`` ``(B, 3, H, 2W)`` (each half through the model's image
processor), ``input_ids``/``attention_mask`` ``(B, L)``, ``labels`` ``(B,)`` long (1 true), ``identifiers``.
Splits (:data:`NLVR2_ROLES`): train on ``train``, stage costs on ``dev``, test on ``test1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Task, eval_mode, image_lengths, model_device, record_loaders, text_lengths

#: the NLVR2 split each role reads: stage costs (val) on dev, the test on test1
NLVR2_ROLES = {"train": "train", "val": "dev", "test": "test1"}


def side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` left and right images as one ``(B, 3, H, 2W)`` image, left | right."""
    if left.shape != right.shape:
        raise ValueError(f"left and right images differ in shape: {tuple(left.shape)} and {tuple(right.shape)}")
    return torch.cat([left, right], dim=-1)


class ReasoningCollator:
    """NLVR2 examples (:class:`~comp_vlm.data.nlvr2.NLVR2Example`, images resolved) as reasoning batches, through
    the model's tokenizer and image processor."""

    def __init__(self, tokenizer: Any, image_processor: Any) -> None:
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        from ..data.files import process_images
        from ..errors import DataError

        unresolved = [ex.identifier for ex in examples if ex.left is None or ex.right is None]
        if unresolved:
            raise DataError(f"NLVR2 example {unresolved[0]!r} has no resolved images (read it with check_images)")
        pixels = process_images([p for ex in examples for p in (ex.left, ex.right)], self.image_processor)
        text = self.tokenizer([ex.sentence for ex in examples], padding=True, truncation=True, return_tensors="pt")
        return {"pixel_values": side_by_side(pixels[0::2], pixels[1::2]), "input_ids": text["input_ids"].long(),
                "attention_mask": text["attention_mask"].long(),
                "labels": torch.tensor([int(ex.label) for ex in examples], dtype=torch.long),
                "identifiers": [ex.identifier for ex in examples]}


def nlvr2_loaders(root: Any, model: nn.Module, tokenizer: Any, image_processor: Any, batch_size: int,
                  eval_batch_size: int | None = None, seed: int = 0) -> Any:
    """Train, val and test reasoning loaders of an NLVR2 folder as released (:data:`NLVR2_ROLES`) for ``model``
    (a :data:`~comp_vlm.tasks.TaskData` loader; the batches do not depend on the model)."""
    from ..data.nlvr2 import read_nlvr2_split

    splits = {role: read_nlvr2_split(root, split) for role, split in NLVR2_ROLES.items()}
    return record_loaders(splits["train"], splits["val"], splits["test"], ReasoningCollator(tokenizer, image_processor),
                          batch_size, eval_batch_size, seed, where=str(root))


def reasoning_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``accuracy`` (percent of argmax = label) and ``loss`` (mean cross-entropy) of ``(N, 2)`` ITM logits."""
    return {"accuracy": 100.0 * float((logits.argmax(-1) == labels).float().mean()),
            "loss": float(F.cross_entropy(logits.float(), labels))}


class ReasoningTask(Task):
    """Side-by-side NLVR2 through ``BlipForImageTextRetrieval``'s ITM head (see the module docstring)."""

    name = "reasoning"
    primary_metric = "accuracy"
    higher_is_better = True
    reference_keys = ("image_size", "image_width", "text_length")
    model_classes = ("BlipForImageTextRetrieval",)

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """``(B, 2)`` ITM logits of the statements against their side-by-side images."""
        self.check_model(model)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], use_itm_head=True, interpolate_pos_encoding=True).itm_score

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.logits(model, batch).float(), batch["labels"])

    def _kd(self, logits: torch.Tensor, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            target = F.log_softmax(self.logits(teacher, batch).float(), -1)
        return F.kl_div(F.log_softmax(logits.float(), -1), target, log_target=True, reduction="batchmean")

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        """KL from the teacher's to the student's true/false distribution."""
        return self._kd(self.logits(student, batch), teacher, batch)

    def loss_with_distill(self, student: nn.Module, teacher: nn.Module, batch: Batch, weight: float) -> torch.Tensor:
        logits = self.logits(student, batch)
        return F.cross_entropy(logits.float(), batch["labels"]) + weight * self._kd(logits, teacher, batch)

    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
        """``accuracy`` (percent) and ``loss`` over every example of ``loader``."""
        device = model_device(model)
        logits, labels = [], []
        with eval_mode(model), torch.no_grad():
            for batch in loader:
                batch = self.batch_to(batch, device)
                logits.append(self.logits(model, batch).float().cpu())
                labels.append(batch["labels"].cpu())
        if not logits:
            raise ValueError("evaluation loader is empty")
        return reasoning_metrics(torch.cat(logits), torch.cat(labels))

    def reference_lengths(self, batch: Batch) -> dict[str, torch.Tensor]:
        """``image_size`` (H), ``image_width`` (2W: the side-by-side image) and the unpadded ``text_length``."""
        return {**image_lengths(batch["pixel_values"]), **text_lengths(batch)}


def reasoning_task(gallery_size: int | None = 0, eval_pairs: int | None = None) -> ReasoningTask:
    """The ``reasoning`` task (no options: ``gallery_size`` and ``eval_pairs`` are the retrieval task's)."""
    return ReasoningTask()


__all__ = ["NLVR2_ROLES", "ReasoningCollator", "ReasoningTask", "nlvr2_loaders", "reasoning_metrics",
           "reasoning_task", "side_by_side"]
