"""Generative VQA (registered as ``vqa``): teacher-forced answer loss, greedy generation, and the official VQAv2
accuracy (:func:`comp_vlm.data.vqa_eval.evaluate_vqa`) as ``vqa_accuracy`` (percent).

Batch contract, so that any family can supply its collator (:func:`register_vqa_collator`, by model class;
:class:`BlipVQACollator` is BLIP's, :class:`LlavaVQACollator` LLaVA's):

- ``loss_inputs``: a dict of tensors; ``model(**loss_inputs).loss`` is the teacher-forced answer loss;
- ``generate_inputs``: a dict of tensors; ``model.generate(**generate_inputs, max_new_tokens=..., num_beams=...)``
  gives answer token ids;
- ``decode``: generated ids -> answer strings (the family's tokenizer);
- ``questions``: the batch's :class:`~comp_vlm.data.vqav2.VQAQuestion` records (with their human answers);
- ``lengths``: the FLOPs reference lengths of every sample (``(B,)`` tensors by reference key).

LLaVA's prompt needs no chat template: ``USER: <image>\n{question} ASSISTANT:`` (:data:`LLAVA_PROMPT`), ``<image>``
expanded to the image's tokens as ``LlavaProcessor`` does, the answer and EOS after it; only those carry labels.

Splits (:func:`vqav2_roles`): VQAv2 releases no test answers, and the emoji world has only ``train`` and ``val``;
stage costs come from a fixed held-out part of train (:func:`held_out_images`, whole images, which dense training
must leave out too) and the test is ``val``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from .base import Batch, Task, eval_mode, image_lengths, model_device, record_loaders

#: the images of train held out for stage costs: as large a part as NLVR2's dev split is of its train (500 / 6000)
HELD_OUT_FRACTION = 1 / 12
#: the longest generated answer, in tokens (BLIP's VQA setting)
MAX_ANSWER_TOKENS = 10
IGNORE_INDEX = -100  # the label of a position that carries no loss (transformers' convention)
#: LLaVA-1.5's VQA prompt without a chat template: ``<image>`` becomes the image's tokens, ``{question}`` the
#: question; the answer follows (a space apart, as the tokenizer splits it)
LLAVA_PROMPT = "USER: <image>\n{question} ASSISTANT:"
IMAGE_TOKEN = "<image>"
#: tokens a vision tower adds to its patches (CLIP's CLS), by vision config ``model_type``: LlavaProcessor's
#: ``num_additional_image_tokens``
EXTRA_VISION_TOKENS = {"clip_vision_model": 1, "siglip_vision_model": 0}


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


def question_pixels(questions: Sequence[Any], image_processor: Any) -> torch.Tensor:
    """``pixel_values`` of the questions' images; DataError for a question whose image was not resolved."""
    from ..data.files import process_images
    from ..errors import DataError

    missing = [q.question_id for q in questions if q.image is None]
    if missing:
        raise DataError(f"question_id {missing[0]} has no resolved image (read it with check_images)")
    return process_images([q.image for q in questions], image_processor)


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
        pixels = question_pixels(questions, self.image_processor)
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


def llava_image_tokens(config: Any, height: int, width: int) -> int:
    """The image tokens one ``height`` x ``width`` image fills in a LLaVA prompt, as ``LlavaProcessor`` counts
    them: patches plus the tower's extra tokens (:data:`EXTRA_VISION_TOKENS`), less one under the ``default``
    feature selection (which drops CLS)."""
    from ..errors import ConfigError

    vc = config.vision_config
    if vc.model_type not in EXTRA_VISION_TOKENS:
        raise ConfigError(f"LLaVA VQA does not know the image tokens of a {vc.model_type} vision tower "
                          f"(known: {', '.join(EXTRA_VISION_TOKENS)})")
    tokens = (height // vc.patch_size) * (width // vc.patch_size) + EXTRA_VISION_TOKENS[vc.model_type]
    return tokens - (config.vision_feature_select_strategy == "default")


def pad_rows(rows: Sequence[Sequence[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``rows`` as a ``(B, longest)`` tensor padded with ``value`` on the left or the right, and its attention
    mask."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row, dtype=torch.long), 1
    return ids, mask


class LlavaVQACollator:
    """VQAv2 questions (images resolved, answers loaded) as ``vqa`` batches for ``LlavaForConditionalGeneration``,
    through its tokenizer and image processor. A prompt is BOS (when the tokenizer has one) and ``prompt`` (by
    default :data:`LLAVA_PROMPT`) with ``<image>`` expanded to :func:`llava_image_tokens` image tokens, which the
    tokenizer must read as one token each of the model's ``image_token_id``. The loss inputs are prompt + answer +
    EOS, right-padded, with labels on the answer and EOS only (their first labelled position is the answer start
    the adapter reads); the generate inputs are the prompts, left-padded. ``text_length`` counts a prompt's tokens
    less its image tokens."""

    def __init__(self, tokenizer: Any, image_processor: Any, config: Any, prompt: str = LLAVA_PROMPT) -> None:
        from ..errors import ConfigError

        if prompt.count(IMAGE_TOKEN) != 1 or "{question}" not in prompt:
            raise ConfigError(f"a LLaVA VQA prompt needs one {IMAGE_TOKEN} and a {{question}}, got {prompt!r}")
        if tokenizer.eos_token_id is None:
            raise ConfigError("the LLaVA tokenizer has no EOS token to end the answers with")
        self.tokenizer, self.image_processor, self.config, self.prompt = tokenizer, image_processor, config, prompt
        self.eos = int(tokenizer.eos_token_id)
        self.pad = self.eos if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)

    @classmethod
    def for_model(cls, model: nn.Module, tokenizer: Any, image_processor: Any) -> LlavaVQACollator:
        return cls(tokenizer, image_processor, model.config)

    def prompt_ids(self, questions: Sequence[str], image_tokens: int) -> list[list[int]]:
        """The token ids of each question's prompt; ConfigError unless each holds ``image_tokens`` image
        tokens."""
        from ..errors import ConfigError

        image_id = self.config.image_token_id
        expanded = self.prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens)
        texts = [expanded.replace("{question}", q) for q in questions]
        bos = [] if self.tokenizer.bos_token_id is None else [int(self.tokenizer.bos_token_id)]
        rows = [bos + list(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        for question, row in zip(questions, rows):
            if row.count(image_id) != image_tokens:
                raise ConfigError(f"the LLaVA prompt of {question!r} holds {row.count(image_id)} tokens of the "
                                  f"model's image_token_id {image_id}, not the image's {image_tokens}: the tokenizer "
                                  f"must read {IMAGE_TOKEN} as one token of that id")
        return rows

    def decode(self, ids: torch.Tensor, prompt_width: int) -> list[str]:
        """The answers of generated ``ids`` (the ``prompt_width`` prompt slots first, as generate returns them)."""
        return [a.strip() for a in self.tokenizer.batch_decode(ids[:, prompt_width:], skip_special_tokens=True)]

    def __call__(self, questions: Sequence[Any]) -> dict[str, Any]:
        pixels = question_pixels(questions, self.image_processor)
        image_tokens = llava_image_tokens(self.config, *pixels.shape[-2:])
        prompts = self.prompt_ids([q.question for q in questions], image_tokens)
        answers = [list(ids) + [self.eos] for ids in
                   self.tokenizer([training_answer(q) for q in questions], add_special_tokens=False)["input_ids"]]
        ids, mask = pad_rows([p + a for p, a in zip(prompts, answers)], self.pad, left=False)
        labels, _ = pad_rows([[IGNORE_INDEX] * len(p) + a for p, a in zip(prompts, answers)], IGNORE_INDEX, left=False)
        prompt_ids, prompt_mask = pad_rows(prompts, self.pad, left=True)
        return {"loss_inputs": {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels},
                "generate_inputs": {"input_ids": prompt_ids, "attention_mask": prompt_mask, "pixel_values": pixels},
                "decode": partial(self.decode, prompt_width=prompt_ids.shape[1]), "questions": list(questions),
                "lengths": {**image_lengths(pixels),
                            "text_length": torch.tensor([len(p) - image_tokens for p in prompts])}}


#: (model, tokenizer, image processor) -> the collator of ``vqa`` batches for that model
VQACollatorFactory = Callable[[nn.Module, Any, Any], Callable[[Sequence[Any]], dict[str, Any]]]

#: the ``vqa`` collator factory of each model class, by class name (:func:`register_vqa_collator`)
VQA_COLLATORS: dict[str, VQACollatorFactory] = {}


def register_vqa_collator(model_class: str, factory: VQACollatorFactory) -> VQACollatorFactory:
    """Make ``factory`` build the ``vqa`` collator of models of class ``model_class`` (by name; once each)."""
    from ..registry import register_once

    return register_once(VQA_COLLATORS, model_class, factory, f"a vqa collator for {model_class}")


def vqa_collator(model: nn.Module, tokenizer: Any, image_processor: Any) -> Callable[[Sequence[Any]], dict[str, Any]]:
    """The registered ``vqa`` collator of ``model``'s class; ConfigError naming the classes that have one."""
    from ..errors import ConfigError

    name = type(model).__name__
    if name not in VQA_COLLATORS:
        raise ConfigError(f"task vqa has no collator for {name} (it has: {', '.join(VQA_COLLATORS)})")
    return VQA_COLLATORS[name](model, tokenizer, image_processor)


register_vqa_collator("BlipForQuestionAnswering", BlipVQACollator.for_model)
register_vqa_collator("LlavaForConditionalGeneration", LlavaVQACollator.for_model)


def vqav2_loaders(root: Any, model: nn.Module, tokenizer: Any, image_processor: Any, batch_size: int,
                  eval_batch_size: int | None = None, seed: int = 0) -> Any:
    """Train, val and test ``vqa`` loaders of a VQAv2 folder (:func:`vqav2_roles`) for ``model``, through its
    class's collator (:func:`vqa_collator`; a :data:`~comp_vlm.tasks.TaskData` loader)."""
    roles = vqav2_roles(root)
    return record_loaders(roles["train"], roles["val"], roles["test"], vqa_collator(model, tokenizer, image_processor),
                          batch_size, eval_batch_size, seed, where=str(root))


class VQATask(Task):
    """Generative VQA over the batch contract of the module docstring."""

    name = "vqa"
    primary_metric = "vqa_accuracy"
    higher_is_better = True
    reference_keys = ("image_size", "image_width", "text_length", "answer_length")

    def __init__(self, max_answer_tokens: int = MAX_ANSWER_TOKENS, num_beams: int = 1, use_cache: bool = True) -> None:
        self.max_answer_tokens, self.num_beams, self.use_cache = max_answer_tokens, num_beams, use_cache

    @property  # type: ignore[override]
    def model_classes(self) -> tuple[str, ...]:
        """The model classes with a registered collator (:func:`register_vqa_collator`)."""
        return tuple(VQA_COLLATORS)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        self.check_model(model)
        return model(**batch["loss_inputs"]).loss

    def answers(self, model: nn.Module, batch: Batch) -> list[str]:
        """The generated answer of every question of ``batch`` (greedy with ``num_beams`` 1; ``use_cache=False``
        recomputes the prefix at every step)."""
        self.check_model(model)
        ids = model.generate(**batch["generate_inputs"], max_new_tokens=self.max_answer_tokens,
                             num_beams=self.num_beams, do_sample=False, use_cache=self.use_cache)
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
        """The collator's ``lengths``: ``image_size``, ``image_width`` and ``text_length``; BLIP's ``text_length`` is
        the unpadded question and its ``answer_length`` the decoder's teacher-forced tokens (start and end token
        included); LLaVA's ``text_length`` is the prompt less its image tokens, and it has no ``answer_length`` (its
        FLOPs reference is generate's prefill)."""
        return dict(batch["lengths"])


def vqa_task(gallery_size: int | None = 0, eval_pairs: int | None = None) -> VQATask:
    """The ``vqa`` task (no options: ``gallery_size`` and ``eval_pairs`` are the retrieval task's)."""
    return VQATask()


__all__ = ["EXTRA_VISION_TOKENS", "HELD_OUT_FRACTION", "IMAGE_TOKEN", "LLAVA_PROMPT", "MAX_ANSWER_TOKENS",
           "VQA_COLLATORS", "BlipVQACollator", "LlavaVQACollator", "VQACollatorFactory", "VQATask", "held_out_images",
           "llava_image_tokens", "pad_rows", "question_pixels", "register_vqa_collator", "split_held_out",
           "training_answer", "vqa_collator", "vqa_task", "vqav2_loaders", "vqav2_roles"]
