"""A model family registers its own presets, dense builder and tasks (issue 20 items 7, 8, 11): a test-only family
(a CLIPModel subclass, an adapter subclass, a preset and a task, registered here and removed after) is loaded,
listed, built and evaluated without any shared function naming it, and its task sets the FLOPs reference."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tiny_clip import fresh, quick, tiny_setup
from transformers import CLIPModel

import comp_vlm
from comp_vlm import demo, tasks, zoo
from comp_vlm.adapters.base import _REGISTRY, register_adapter
from comp_vlm.adapters.clip import CLIPAdapter
from comp_vlm.api import check_task
from comp_vlm.cli import build_parser
from comp_vlm.dense import DenseTraining
from comp_vlm.errors import ConfigError, UnsupportedModelError
from comp_vlm.tasks.retrieval import RetrievalTask

FAMILY, TASK, PRESET = "test-family", "test-retrieval", "test-family-tiny"
REFERENCE_LENGTH = 3  # the test task's reference text length, unlike any caption's


class FamilyModel(CLIPModel):
    """A model class no shipped adapter names."""


class FamilyAdapter(CLIPAdapter):
    family = FAMILY
    model_classes = (FamilyModel,)


class FixedLengthTask(RetrievalTask):
    """Retrieval whose FLOPs reference counts REFERENCE_LENGTH text tokens per sample, whatever the captions."""

    def reference_lengths(self, batch):
        return {"text_length": torch.full((batch["input_ids"].shape[0],), REFERENCE_LENGTH)}


def family_dense(preset, tokenizer):
    return zoo.build_config(preset, tokenizer), FamilyModel


@pytest.fixture
def family():
    """The test family's adapter, dense builder, preset and task, registered for the test and removed after."""
    quick_preset = zoo.BUILTINS["demo-clip-quick"]
    preset = zoo.ModelPreset(PRESET, "test-only", family=FAMILY, **{
        k: getattr(quick_preset, k) for k in ("image_size", "patch_size", "vision_hidden", "text_hidden", "layers",
                                              "heads", "projection_dim", "max_positions", "max_objects")},
        n_train=64, n_val=32, n_test=32, batch_size=16, eval_batch_size=32, gallery_size=16,
        dense=DenseTraining(steps=2, lr=1e-3, warmup=1, weight_decay=0.0))
    register_adapter(FamilyAdapter)
    zoo.register_dense_builder(FAMILY, family_dense)
    zoo.register_preset(preset)
    tasks.register_task(TASK, lambda gallery_size, eval_pairs: FixedLengthTask(gallery_size=gallery_size or None))
    try:
        yield preset
    finally:
        _REGISTRY.remove(FamilyAdapter)
        del zoo.DENSE_BUILDERS[FAMILY], zoo.BUILTINS[PRESET], tasks.TASKS[TASK]


def family_dir(tmp_path: Path) -> Path:
    """A dense directory of the test family (the quick built-in's architecture, tokenizer and processor)."""
    spec = zoo.BUILTINS["demo-clip-quick"]
    world = zoo.make_world(spec.image_size, spec.max_objects, 0)
    tokenizer = zoo.build_tokenizer(world, spec)
    torch.manual_seed(0)
    model = FamilyModel._from_config(zoo.build_config(spec, tokenizer))
    return demo.save_dense_dir(model, tmp_path / "family", tokenizer, world.image_processor())


def test_load_dense_dir_builds_the_registered_class(family, tmp_path):
    from comp_vlm.loading import load_dense_dir

    model = load_dense_dir(family_dir(tmp_path))
    assert type(model) is FamilyModel and isinstance(comp_vlm.get_adapter(model), FamilyAdapter)
    assert model.config._attn_implementation == FamilyAdapter.attn_implementation


def test_a_config_no_adapter_takes_is_refused_naming_the_registered_classes(tmp_path):
    from transformers import BertConfig

    from comp_vlm.loading import dense_model_class

    with pytest.raises(UnsupportedModelError, match=r"'bert' model; comp-vlm prunes (.*, )?CLIPModel(, .*)? checkpoints"):
        dense_model_class(tmp_path, BertConfig())


def test_the_cli_lists_registered_tasks(family):
    prune = build_parser()._subparsers._group_actions[0].choices["prune"]
    action = next(a for a in prune._actions if "--task" in a.option_strings)
    assert tuple(action.choices) == ("retrieval", "reasoning", "vqa", TASK)
    assert build_parser().parse_args(["eval", "out", "--task", TASK]).task == TASK


def test_registering_a_name_twice_is_refused(family):
    with pytest.raises(ConfigError, match="already registered"):
        tasks.register_task(TASK, lambda g, e: FixedLengthTask())
    with pytest.raises(ConfigError, match="already registered"):
        zoo.register_preset(family)
    with pytest.raises(ConfigError, match="^a dense builder for family 'clip' is already registered$"):
        zoo.register_dense_builder("clip", zoo.DENSE_BUILDERS["clip"])
    from comp_vlm.tasks.vqa import VQA_COLLATORS, register_vqa_collator

    name = next(iter(VQA_COLLATORS))
    with pytest.raises(ConfigError, match=f"^a vqa collator for {name} is already registered$"):
        register_vqa_collator(name, VQA_COLLATORS[name])
    with pytest.raises(ConfigError, match="not supported yet"):
        check_task("no-such-task")


def test_builtin_dense_builds_the_family_of_its_preset(family):
    task = check_task(TASK, 0)
    dense = zoo.builtin_dense(family, 0, "cpu", None, task, progress=False)
    assert type(dense.model) is FamilyModel


def test_evaluate_dir_runs_a_registered_task_at_its_reference(family, tmp_path):
    result = comp_vlm.evaluate_dir(family_dir(tmp_path), data="synthetic", task=TASK, n_test=32, gallery_size=0,
                                   progress=False)
    assert result["task"] == TASK and not result["pruned"]
    assert result["reference"]["text_length"] == REFERENCE_LENGTH


def test_the_task_supplies_the_search_reference_lengths():
    cfg, _, loaders = tiny_setup()
    config = quick(ratio=0.3, finetune_steps=0, stage_steps=2, reference={"image_size": 16})
    result = comp_vlm.prune(fresh(cfg), FixedLengthTask(), loaders.train, loaders.val, config)
    assert result.recipe.reference["text_length"] == REFERENCE_LENGTH


CLIP_NAMES = re.compile(r"""CLIPModel|["']clip["']""")
CLIP_FILES = ("adapters/clip.py", "zoo.py")  # the family's adapter and the presets


def test_clip_is_named_only_by_its_adapter_and_the_presets():
    root = Path(comp_vlm.__file__).parent
    found = [f"{path.relative_to(root)}:{n}" for path in sorted(root.rglob("*.py"))
             if str(path.relative_to(root)) not in CLIP_FILES
             for n, line in enumerate(path.read_text().splitlines(), 1) if CLIP_NAMES.search(line)]
    assert found == []
