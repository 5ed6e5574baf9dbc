"""Tasks: what the engine trains and measures (loss, validation loss, metrics)."""

from .base import Task
from .retrieval import RetrievalTask, retrieval_metrics

__all__ = ["RetrievalTask", "Task", "retrieval_metrics"]
