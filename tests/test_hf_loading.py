"""Pruned directories load the Hugging Face way (issue 19 §4): ``AutoModel.from_pretrained(out,
trust_remote_code=True)`` and a zero-shot pipeline from the directory give what ``load_pruned`` gives; transformers'
own classes refuse the directory (never random weights); ``save_pretrained`` of a pruned model writes a directory
that loads again."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
import transformers.dynamic_module_utils
from conftest import WORDS
from PIL import Image
from test_clip_adapter import embeds
from test_io import pruned_model
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoTokenizer,
    CLIPModel,
    PreTrainedModel,
    pipeline,
)

import comp_vlm
from comp_vlm import ConfigError, load_pruned, read_recipe, save_pruned
from comp_vlm.data.processor import make_image_processor
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.io import LEGACY_WEIGHTS_FILE, WEIGHTS_FILE
from comp_vlm.remote import CARD_FILE, MODULE_FILE

V1_MODEL = Path(__file__).parent / "fixtures" / "v1_pruned_clip" / "model"
LABELS = ["red circle", "blue square", "green triangle", "small big"]


@pytest.fixture(scope="module", autouse=True)
def offline_hub(tmp_path_factory):
    """No network, and transformers' dynamic-module cache (HF_MODULES_CACHE) in a temporary directory."""
    modules = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_MODULES_CACHE", str(modules))
        mp.setattr(transformers.dynamic_module_utils, "HF_MODULES_CACHE", str(modules))
        mp.setattr(sys, "path", list(sys.path))  # transformers appends the cache to sys.path
        yield


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    """A tiny pruned CLIP saved with its tokenizer and image processor."""
    processor = make_image_processor(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    return save_pruned(pruned_model(), tmp_path_factory.mktemp("hf") / "out", tokenizer=build_word_tokenizer(WORDS),
                       image_processor=processor)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    texts = ["a photo of a red circle", "this is a small blue square left of a big green triangle", "red"]
    return torch.randn(2, 3, 16, 16, generator=g), build_word_tokenizer(WORDS)(texts, padding=True,
                                                                                return_tensors="pt")


def assert_same(a: CLIPModel, b: CLIPModel, inputs) -> None:
    """Bit-identical image and text embeddings and logits (one process, one kernel)."""
    for x, y in zip(embeds(a, *inputs), embeds(b, *inputs)):
        assert torch.equal(x, y)


def image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForZeroShotImageClassification])
def test_auto_classes_with_remote_code_load_what_load_pruned_loads(out, inputs, auto_class):
    model = auto_class.from_pretrained(str(out), trust_remote_code=True)
    reference = load_pruned(out)
    assert type(model) is CLIPModel and not model.training
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert comp_vlm.count_flops(model) == comp_vlm.count_flops(reference) < get_dense_flops(reference)
    assert_same(model, reference, inputs)


def get_dense_flops(model) -> int:
    return comp_vlm.get_adapter(model).dense_flops()


def test_zero_shot_pipeline_from_the_directory_scores_as_load_pruned(out):
    from_dir = pipeline("zero-shot-image-classification", model=str(out), trust_remote_code=True)
    by_hand = pipeline("zero-shot-image-classification", model=load_pruned(out),
                       tokenizer=AutoTokenizer.from_pretrained(str(out)),
                       image_processor=AutoImageProcessor.from_pretrained(str(out)))
    got, expected = (p(image(), candidate_labels=LABELS) for p in (from_dir, by_hand))
    assert [r["label"] for r in got] == [r["label"] for r in expected]
    assert [r["score"] for r in got] == [r["score"] for r in expected]
    assert sorted(r["label"] for r in got) == sorted(LABELS) and abs(sum(r["score"] for r in got) - 1) < 1e-6


@pytest.mark.parametrize("kwargs", [{}, {"ignore_mismatched_sizes": True}])
def test_transformers_own_classes_refuse_the_directory(out, kwargs):
    """No random weights: CLIPModel (and AutoModel without remote code) find no weights file they read."""
    with pytest.raises(OSError, match="no file named model.safetensors"):
        CLIPModel.from_pretrained(str(out), **kwargs)
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModel.from_pretrained(str(out), **kwargs)
    assert (out / WEIGHTS_FILE).is_file() and not (out / LEGACY_WEIGHTS_FILE).exists()
    card = (out / CARD_FILE).read_text()
    assert "trust_remote_code=True" in card and "comp_vlm.load_pruned" in card


def test_save_pretrained_of_a_loaded_pruned_model_loads_again(out, inputs, tmp_path):
    model = load_pruned(out)
    model.save_pretrained(tmp_path / "d", safe_serialization=True, max_shard_size="1GB")
    assert read_recipe(tmp_path / "d").to_dict() == read_recipe(out).to_dict()
    assert (tmp_path / "d" / MODULE_FILE).read_bytes() == (out / MODULE_FILE).read_bytes()
    assert_same(load_pruned(tmp_path / "d"), model, inputs)
    assert_same(AutoModel.from_pretrained(str(tmp_path / "d"), trust_remote_code=True), model, inputs)
    # instance-level: the class, and other instances, keep transformers' save_pretrained
    assert CLIPModel.save_pretrained is PreTrainedModel.save_pretrained
    assert "save_pretrained" not in vars(CLIPModel._from_config(model.config))


def test_save_pretrained_refuses_what_it_cannot_do_in_one_line(out, tmp_path):
    model = load_pruned(out)
    for kwargs, named in (({"push_to_hub": True}, "push_to_hub=True"),
                          ({"state_dict": model.state_dict()}, "state_dict (a OrderedDict)")):
        with pytest.raises(ConfigError) as exc:
            model.save_pretrained(tmp_path / "d", **kwargs)
        assert named in str(exc.value) and "\n" not in str(exc.value)
    model.save_pretrained(tmp_path / "d", is_main_process=False)  # only the main process writes
    assert not (tmp_path / "d").exists()


def test_the_models_prune_returns_save_pretrained_a_loadable_directory(tmp_path):
    from tiny_clip import fresh, quick, tiny_setup

    from comp_vlm.tasks import RetrievalTask

    cfg, tok, loaders = tiny_setup()
    result = comp_vlm.prune(fresh(cfg), RetrievalTask(), loaders.train, list(loaders.val),
                            quick(ratio=0.3, snapshots=(0.15,)))
    for ratio, (model, recipe) in result.snapshots.items():
        model.save_pretrained(tmp_path / f"r{ratio}")
        assert read_recipe(tmp_path / f"r{ratio}").to_dict() == recipe.to_dict()
        pixels, text = torch.randn(2, 3, 16, 16), tok(["a red circle", "a blue square"], padding=True,
                                                      return_tensors="pt")
        assert_same(AutoModel.from_pretrained(str(tmp_path / f"r{ratio}"), trust_remote_code=True), model,
                    (pixels, text))


def test_a_directory_saved_before_the_rename_loads_and_save_pretrained_upgrades_it(tmp_path):
    assert (V1_MODEL / LEGACY_WEIGHTS_FILE).is_file() and not (V1_MODEL / WEIGHTS_FILE).exists()
    model = load_pruned(V1_MODEL)
    model.save_pretrained(tmp_path / "new")
    assert (tmp_path / "new" / WEIGHTS_FILE).is_file() and not (tmp_path / "new" / LEGACY_WEIGHTS_FILE).exists()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = AutoTokenizer.from_pretrained(str(V1_MODEL))(["a red circle"], return_tensors="pt")
    assert_same(AutoModel.from_pretrained(str(tmp_path / "new"), trust_remote_code=True), model, (pixels, text))


def test_from_pretrained_honours_dtype_attention_and_one_device_and_refuses_the_rest(out, inputs):
    model = AutoModel.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float64, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    reference = load_pruned(out)
    for x, y in zip(embeds(model, inputs[0].double(), inputs[1]), embeds(reference, *inputs)):
        assert torch.allclose(x.float(), y, atol=1e-5)
    eager = AutoModel.from_pretrained(str(out), trust_remote_code=True, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager" != reference.config._attn_implementation
    assert_same(eager, load_pruned(out, attn_implementation="eager"), inputs)
    for kwargs, named in (({"device_map": "auto"}, "device_map='auto'"),
                          ({"device_map": {"": "cpu"}}, "device_map={'': 'cpu'}"),
                          ({"load_in_8bit": True}, "load_in_8bit=True")):
        with pytest.raises(ConfigError) as exc:
            AutoModel.from_pretrained(str(out), trust_remote_code=True, **kwargs)
        assert named in str(exc.value) and "\n" not in str(exc.value)


def test_without_comp_vlm_the_remote_module_says_what_is_missing(out, tmp_path, monkeypatch):
    elsewhere = tmp_path / "copied"  # another directory name: transformers imports the module afresh
    shutil.copytree(out, elsewhere)
    monkeypatch.setitem(sys.modules, "comp_vlm.remote", None)
    with pytest.raises(ImportError, match="comp-vlm pruned model: loading it needs the comp-vlm package"):
        AutoModel.from_pretrained(str(elsewhere), trust_remote_code=True)
