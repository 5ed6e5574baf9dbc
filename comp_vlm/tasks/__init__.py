"""Tasks: what the engine trains and measures (loss, validation loss, metrics), and the registry of the tasks the
command line and :func:`comp_vlm.api.check_task` name. A family adds its tasks with :func:`register_task`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import ConfigError
from ..registry import register_once
from .base import Task
from .reasoning import ReasoningTask, nlvr2_loaders, reasoning_task
from .retrieval import RetrievalTask, retrieval_metrics, retrieval_task
from .vqa import VQATask, vqa_task, vqav2_loaders

#: (gallery_size, eval_pairs) -> the task: the command line's options (a task without galleries ignores the first;
#: ``eval_pairs`` is the smallest split it will evaluate)
TaskFactory = Callable[[int | None, int | None], Task]

#: registered tasks by name, in registration order (the CLI's ``--task`` choices)
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> TaskFactory:
    """Make ``name`` a task ``--task`` and :func:`make_task` accept, built by ``factory``; a name is registered
    once."""
    return register_once(TASKS, name, factory, f"task {name!r}")


#: (data directory, model, tokenizer, image processor, batch_size, eval_batch_size, seed) -> loaders with ``train``
#: (shuffled, re-iterable), ``val`` and ``test`` (lists of batches): how a task reads a data directory of its format
TaskData = Callable[..., Any]

#: the data-directory loader of each task that reads one of its own (``--data DIR``), by task name
TASK_DATA: dict[str, TaskData] = {}


def register_task_data(name: str, loader: TaskData) -> TaskData:
    """Make ``loader`` how task ``name`` reads a data directory (its own format: NLVR2 for reasoning, ...)."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not registered")
    TASK_DATA[name] = loader
    return loader


def task_data(name: str) -> TaskData | None:
    """The data-directory loader of task ``name`` (None: the task reads the shared retrieval data)."""
    return TASK_DATA.get(name)


def task_names() -> tuple[str, ...]:
    return tuple(TASKS)


def make_task(name: str, gallery_size: int | None = 0, eval_pairs: int | None = None) -> Task:
    """The registered task ``name`` for the given options; ConfigError naming the registered ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"task {name!r} is not supported yet (supported: {', '.join(TASKS)})")
    return TASKS[name](gallery_size, eval_pairs)


def tasks_for_model(model: object) -> tuple[str, ...]:
    """The registered tasks (at their default options) that run on ``model``."""
    return tuple(name for name, factory in TASKS.items() if factory(None, None).supports(model))


register_task("retrieval", retrieval_task)
register_task("reasoning", reasoning_task)
register_task("vqa", vqa_task)
register_task_data("reasoning", nlvr2_loaders)
register_task_data("vqa", vqav2_loaders)

__all__ = ["TASKS", "TASK_DATA", "ReasoningTask", "RetrievalTask", "Task", "TaskData", "TaskFactory", "VQATask",
           "make_task", "reasoning_task", "register_task", "register_task_data", "retrieval_metrics", "retrieval_task",
           "task_data", "task_names", "tasks_for_model", "vqa_task"]
