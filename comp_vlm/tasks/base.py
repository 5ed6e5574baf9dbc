"""The task protocol the pruning engine drives: a training loss, an evaluation, and a validation loss.

A task knows how to turn a model and a batch into numbers; it knows nothing about pruning or about a particular
architecture (no adapter or model-class imports here). Batches are dicts of tensors (plus optional non-tensor
entries such as caption strings); loaders are any iterables of such batches.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

Batch = Mapping[str, Any]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block and restore every submodule's previous ``training`` flag after
    (per module, so mixed train/eval states survive too)."""
    previous = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, flag in previous.items():
            m.training = flag


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless module)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def text_lengths(batch: Batch) -> dict[str, torch.Tensor]:
    """``{"text_length": unpadded length of each text}`` from ``batch["attention_mask"]`` (empty without one)."""
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    return {} if mask is None else {"text_length": mask.sum(1)}


def mean_reference_lengths(task: Task | None, batches: Iterable[Batch]) -> dict[str, float]:
    """The mean over every sample of ``batches`` of each of ``task.reference_lengths`` (:func:`text_lengths`
    without a task); a key no batch gives is absent."""
    totals: dict[str, list[float]] = {}
    for batch in batches:
        lengths = getattr(task, "reference_lengths", text_lengths)(batch)
        for key, values in lengths.items():
            total = totals.setdefault(key, [0.0, 0])
            total[0] += float(values.sum())
            total[1] += values.shape[0]
    return {key: total / count for key, (total, count) in totals.items() if count}


class Task(ABC):
    """What the engine needs from a task.

    Subclasses set :attr:`primary_metric` (a key of :meth:`evaluate`'s result) and :attr:`higher_is_better`, and
    implement :meth:`loss` and :meth:`evaluate`.
    """

    #: name of the metric, among :meth:`evaluate`'s keys, that decides which model is better
    primary_metric: str = "loss"
    #: whether a larger :attr:`primary_metric` is better
    higher_is_better: bool = True
    #: the FLOPs reference keys :meth:`reference_lengths` gives (the search reads the training data for those the
    #: reference lacks)
    reference_keys: tuple[str, ...] = ("text_length",)
    #: the model classes (by name) the task runs on; None: any model with what the task calls
    model_classes: tuple[str, ...] | None = None
    #: the task's registered name, for messages (the class name when unset)
    name: str | None = None

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Training loss of ``model`` on ``batch`` as a scalar tensor with a graph (the model's current mode and
        grad state are left as they are). ``batch`` is already on the model's device."""

    @abstractmethod
    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
        """Metrics of ``model`` over ``loader`` (eval mode, no grad, previous mode restored). The result holds
        :attr:`primary_metric` and ``"loss"``."""

    def reference_lengths(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The FLOPs reference lengths of every sample of ``batch``, by reference key (one ``(B,)`` tensor each);
        their means over the training data make the search's FLOPs reference (method.md §1). By default the
        unpadded text length (``attention_mask`` sums) as ``text_length``; a task whose sequences hold more than
        the text (LLaVA's image tokens and answer) says what counts."""
        return text_lengths(batch)

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        """Knowledge-distillation loss of ``student`` towards the frozen ``teacher`` on ``batch`` (optional)."""
        from ..errors import ConfigError

        raise ConfigError(f"task {type(self).__name__} has no distillation loss")

    def loss_with_distill(self, student: nn.Module, teacher: nn.Module, batch: Batch, weight: float) -> torch.Tensor:
        """:meth:`loss` + ``weight`` × :meth:`distill_loss`. This default runs the student twice; a task whose two
        losses share the student's outputs overrides it to run the student once (one forward, one set of CIP
        statistics per training step)."""
        return self.loss(student, batch) + weight * self.distill_loss(student, teacher, batch)

    def validation_loss(self, model: nn.Module, batches: Iterable[Batch]) -> float:
        """Mean of :meth:`loss` over a fixed list of batches (each batch weighs the same), in eval mode under
        ``torch.no_grad()``; the model's previous train/eval state is restored afterwards."""
        device = model_device(model)
        total, count = 0.0, 0
        with eval_mode(model), torch.no_grad():
            for batch in batches:
                total += float(self.loss(model, self.batch_to(batch, device)))
                count += 1
        if count == 0:
            raise ValueError("validation_loss needs at least one batch")
        return total / count

    @staticmethod
    def batch_to(batch: Batch, device: torch.device | str) -> dict[str, Any]:
        """A shallow copy of ``batch`` with every tensor moved to ``device``, in nested dicts too (a task's model
        inputs may be grouped, e.g. VQA's ``loss_inputs``); other entries kept as they are."""
        return {k: v.to(device) if isinstance(v, torch.Tensor) else Task.batch_to(v, device) if isinstance(v, dict)
                else v for k, v in batch.items()}

    def supports(self, model: nn.Module) -> bool:
        """Whether the task runs on ``model`` (its class is among :attr:`model_classes`, when they are named)."""
        return self.model_classes is None or type(model).__name__ in self.model_classes

    def check_model(self, model: nn.Module) -> None:
        """ConfigError unless the task :meth:`supports` ``model``, naming the tasks that do."""
        if self.supports(model):
            return
        name = type(model).__name__
        from ..errors import ConfigError
        from . import tasks_for_model

        needs = f"a {' or '.join(self.model_classes)} model" if self.model_classes else "another model"
        raise ConfigError(f"task {self.name or type(self).__name__} needs {needs}, not {name} (tasks for {name}: "
                          f"{', '.join(tasks_for_model(model)) or 'none'})")


class RecordBatches:
    """Records collated into batches on demand: the ``len``/``batch(index)`` interface of
    :class:`~comp_vlm.data.synthetic.ShuffledBatches` and :func:`~comp_vlm.data.synthetic.fixed_batches`."""

    def __init__(self, records: Sequence[Any], collate: Callable[[Sequence[Any]], dict[str, Any]]) -> None:
        self.records, self.collate = list(records), collate

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, index: torch.Tensor) -> dict[str, Any]:
        return self.collate([self.records[i] for i in index.tolist()])


def record_loaders(train: Sequence[Any], val: Sequence[Any], test: Sequence[Any], collate: Callable,
                   batch_size: int, eval_batch_size: int | None = None, seed: int = 0, where: str = "the data") -> Any:
    """Train (shuffled, re-iterable, reshuffled each epoch from ``seed``), val and test (fixed lists of batches in
    record order) loaders of three record lists, each batch made by ``collate``."""
    from ..data.synthetic import RetrievalLoaders, ShuffledBatches, fixed_batches, mix_seed
    from ..errors import ConfigError

    if not 0 < batch_size <= len(train):
        raise ConfigError(f"the training batch size {batch_size} must be between 1 and the {len(train)} training "
                          f"records of {where}")
    eval_bs = eval_batch_size or batch_size
    return RetrievalLoaders(train=ShuffledBatches(RecordBatches(train, collate), batch_size,  # type: ignore[arg-type]
                                                  seed=mix_seed(seed, "shuffle")),
                            val=fixed_batches(RecordBatches(val, collate), eval_bs),  # type: ignore[arg-type]
                            test=fixed_batches(RecordBatches(test, collate), eval_bs))  # type: ignore[arg-type]


def image_lengths(pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """``image_size`` (height) and ``image_width`` of every image of a ``(B, 3, H, W)`` batch, as reference
    lengths."""
    b, _, h, w = pixel_values.shape
    return {"image_size": torch.full((b,), float(h)), "image_width": torch.full((b,), float(w))}
