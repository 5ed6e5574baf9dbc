"""Generative VQA (registered as ``vqa``): teacher-forced answer loss, greedy generation, and the official VQAv2
accuracy (:func:`comp_vlm.data.vqa_eval.evaluate_vqa`) as ``vqa_accuracy`` (percent).

Batch contract, so that any family can supply its collator (:class:`BlipVQACollator` is BLIP's):

- ``loss_inputs``: a dict of tensors; ``model(**loss_inputs).loss`` is the teacher-forced answer loss;
- ``generate_inputs``: a dict of tensors; ``model.generate(**generate_inputs, max_new_tokens=..., num_beams=...)``
  gives answer token ids;
- ``decode``: generated ids -> answer strings (the family's tokenizer);
- ``questions``: the batch's :class:`~comp_vlm.data.vqav2.VQAQuestion` records (with their human answers);
- ``lengths``: the FLOPs reference lengths of every sample (``(B,)`` tensors by reference key).

Splits (:func:`vqav2_roles`): VQAv2 releases no test answers, and the emoji world has only ``train`` and ``val``;
stage costs come from a fixed held-out part of train (:func:`held_out_images`, whole images, which dense training
must leave out too) and the test is ``val``.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from .base import Batch, Task, eval_mode, image_lengths, model_device, record_loaders

#: the images of train held out for stage costs: as large a part as NLVR2's dev split is of its train (500 / 6000)
HELD_OUT_FRACTION = 1 / 12
#: the longest generated answer, in tokens (BLIP's VQA setting)
MAX_ANSWER_TOKENS = 10


def held_out_images(questions: Sequence[Any], fraction: float = HELD_OUT_FRACTION) -> set[int]:
    """A fixed ``fraction`` of the image ids of ``questions`` (at least one, never all): those with the smallest
    CRC-32 of their id, so the choice depends on the ids alone (not on a seed or the file order)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    ids = sorted({q.image_id for q in questions}, key=lambda i: (zlib.crc32(str(i).encode()), i))
    if len(ids) < 2:
        from ..errors import DataError

        raise DataError(f"{len(ids)} image(s) cannot be split into training and held-out images")
    return set(ids[:min(len(ids) - 1, max(1, round(fraction * len(ids))))])


def split_held_out(questions: Sequence[Any], fraction: float = HELD_OUT_FRACTION) -> tuple[list, list]:
    """``questions`` as (training, held-out) by :func:`held_out_images`; an image's questions stay together."""
    held = held_out_images(questions, fraction)
    return [q for q in questions if q.image_id not in held], [q for q in questions if q.image_id in held]


def vqav2_roles(root: Any, fraction: float = HELD_OUT_FRACTION) -> dict[str, list]:
    """The questions of each role of a VQAv2 folder: ``train`` and ``val`` (stage costs) from the ``train2014``
    (or, as the emoji world names it, ``train``) subtype by :func:`split_held_out`, ``test`` the ``val2014`` (or
    ``val``) subtype."""
    from ..data.vqav2 import read_vqav2_split

    train, val = split_held_out(read_vqav2_split(root, _subtype(root, "train")), fraction)
    return {"train": train, "val": val, "test": read_vqav2_split(root, _subtype(root, "val"))}


def _subtype(root: Any, role: str) -> str:
    """The subtype of ``root`` serving ``role``: ``<role>2014`` (VQAv2 as released) or ``<role>`` (the emoji
    world), whichever has a questions file."""
    from pathlib import Path

    from ..errors import DataError

    for subtype in (f"{role}2014", role):
        if any(Path(root).glob(f"v2_OpenEnded_*_{subtype}_questions.json")):
            return subtype
    raise DataError(f"{root}: no questions file for subtype {role}2014 or {role}")


def training_answer(question: Any) -> str:
    """The answer a question is trained on: its ``multiple_choice_answer`` (the most common human answer)."""
    from ..data.vqav2 import most_common_answer
    from ..errors import DataError

    if question.multiple_choice_answer:
        return question.multiple_choice_answer
    if not question.answers:
        raise DataError(f"question_id {question.question_id} has no answers (annotations not loaded?)")
    return most_common_answer(question.answers)


class BlipVQACollator:
    """VQAv2 questions (images resolved, answers loaded) as ``vqa`` batches for ``BlipForQuestionAnswering``,
    through its tokenizer and image processor. The decoder input is the tokenized answer with its first token set
    to the decoder's start token (``decoder_bos_id``, the text config's ``bos_token_id``); the labels are the same
    ids with padding as -100 (passed apart: -100 is no decoder input). The question mask goes to the model, whose
    adapter hands the decoder the validity of the surviving question slots."""

    def __init__(self, tokenizer: Any, image_processor: Any, decoder_bos_id: int) -> None:
        self.tokenizer, self.image_processor, self.decoder_bos_id = tokenizer, image_processor, int(decoder_bos_id)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, image_processor: Any) -> BlipVQACollator:
        return cls(tokenizer, image_processor, model.config.text_config.bos_token_id)

    def decode(self, ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def __call__(self, questions: Sequence[Any]) -> dict[str, Any]:
        from ..data.files import process_images
        from ..errors import DataError

        missing = [q.question_id for q in questions if q.image is None]
        if missing:
            raise DataError(f"question_id {missing[0]} has no resolved image (read it with check_images)")
        pixels = process_images([q.image for q in questions], self.image_processor)
        tokenize = partial(self.tokenizer, padding=True, truncation=True, return_tensors="pt")
        text = tokenize([q.question for q in questions])
        answer = tokenize([training_answer(q) for q in questions])
        decoder_ids, decoder_mask = answer["input_ids"].long().clone(), answer["attention_mask"].long()
        decoder_ids[:, 0] = self.decoder_bos_id
        question = {"input_ids": text["input_ids"].long(), "attention_mask": text["attention_mask"].long(),
                    "pixel_values": pixels}
        return {"loss_inputs": {**question, "decoder_input_ids": decoder_ids, "decoder_attention_mask": decoder_mask,
                                "labels": decoder_ids.masked_fill(decoder_mask == 0, -100)},
                "generate_inputs": question, "decode": self.decode, "questions": list(questions),
                "lengths": {**image_lengths(pixels), "text_length": question["attention_mask"].sum(1),
                            "answer_length": decoder_mask.sum(1)}}


def vqav2_loaders(root: Any, model: nn.Module, tokenizer: Any, image_processor: Any, batch_size: int,
                  eval_batch_size: int | None = None, seed: int = 0) -> Any:
    """Train, val and test ``vqa`` loaders of a VQAv2 folder (:func:`vqav2_roles`) for a BLIP VQA model (a
    :data:`~comp_vlm.tasks.TaskData` loader)."""
    roles = vqav2_roles(root)
    return record_loaders(roles["train"], roles["val"], roles["test"],
                          BlipVQACollator.for_model(model, tokenizer, image_processor), batch_size, eval_batch_size,
                          seed, where=str(root))


class VQATask(Task):
    """Generative VQA over the batch contract of the module docstring."""

    name = "vqa"
    primary_metric = "vqa_accuracy"
    higher_is_better = True
    reference_keys = ("image_size", "image_width", "text_length", "answer_length")
    model_classes = ("BlipForQuestionAnswering",)

    def __init__(self, max_answer_tokens: int = MAX_ANSWER_TOKENS, num_beams: int = 1) -> None:
        self.max_answer_tokens, self.num_beams = max_answer_tokens, num_beams

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        self.check_model(model)
        return model(**batch["loss_inputs"]).loss

    def answers(self, model: nn.Module, batch: Batch) -> list[str]:
        """The generated answer of every question of ``batch`` (greedy with ``num_beams`` 1)."""
        self.check_model(model)
        ids = model.generate(**batch["generate_inputs"], max_new_tokens=self.max_answer_tokens,
                             num_beams=self.num_beams, do_sample=False)
        return batch["decode"](ids)

    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
        """``vqa_accuracy`` (the official accuracy, percent), ``vqa_accuracy/<answer type>`` and ``loss`` (mean
        over batches)."""
        from ..data.vqa_eval import evaluate_vqa

        device = model_device(model)
        predictions: dict[int, str] = {}
        questions: list[Any] = []
        losses: list[float] = []
        with eval_mode(model), torch.no_grad():
            for batch in loader:
                batch = self.batch_to(batch, device)
                losses.append(float(self.loss(model, batch)))
                predictions.update((q.question_id, a) for q, a in zip(batch["questions"], self.answers(model, batch)))
                questions += batch["questions"]
        if not questions:
            raise ValueError("evaluation loader is empty")
        result = evaluate_vqa(predictions, questions)
        return {"vqa_accuracy": result["overall"], "loss": sum(losses) / len(losses),
                **{f"vqa_accuracy/{kind}": acc for kind, acc in result["per_answer_type"].items() if kind}}

    def reference_lengths(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The collator's ``lengths``: ``image_size``, ``image_width``, the unpadded question (``text_length``) and
        the decoder's teacher-forced tokens (``answer_length``, start token and end token included)."""
        return dict(batch["lengths"])


def vqa_task(gallery_size: int | None = 0, eval_pairs: int | None = None) -> VQATask:
    """The ``vqa`` task (no options: ``gallery_size`` and ``eval_pairs`` are the retrieval task's)."""
    return VQATask()


__all__ = ["HELD_OUT_FRACTION", "MAX_ANSWER_TOKENS", "BlipVQACollator", "VQATask", "held_out_images",
           "split_held_out", "training_answer", "vqa_task", "vqav2_loaders", "vqav2_roles"]
