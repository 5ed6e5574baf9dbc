"""Retrieval batches read from a Karpathy-format folder: every caption paired with its image through the image
processor, lazy and preloaded images alike, and RetrievalTask evaluation on them with a tiny CLIP (from a COCO-style
fixture and from an emoji world written by the tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_clip

from comp_vlm.data.emoji_sources import SpriteFolder, load_concepts
from comp_vlm.data.emoji_world import WorldConfig, write_world
from comp_vlm.data.files import open_rgb
from comp_vlm.data.karpathy import (
    ImageTextPairs,
    caption_vocabulary,
    karpathy_batches,
    karpathy_loaders,
    read_karpathy,
)
from comp_vlm.data.processor import make_image_processor
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.errors import DataError
from comp_vlm.tasks.retrieval import RetrievalTask, retrieval_metrics

FIXTURES = Path(__file__).parent / "fixtures"
COCO, FLICKR, EMOJI = FIXTURES / "coco_karpathy", FIXTURES / "flickr30k_karpathy", FIXTURES / "emoji"
PROCESSOR = make_image_processor(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def tok():
    words = caption_vocabulary([c for folder in (COCO, FLICKR) for im in read_karpathy(folder, check_images=False)
                                for c in im.captions])
    return build_word_tokenizer(words)


def processed(path: Path) -> torch.Tensor:
    return PROCESSOR([open_rgb(path)], return_tensors="pt")["pixel_values"][0]


def test_loaders_pair_every_caption_with_its_image(tok):
    loaders = karpathy_loaders(COCO, tok, PROCESSOR, batch_size=5, eval_batch_size=4, progress=False)
    images = {im.image_id: im for im in read_karpathy(COCO)}
    train = list(loaders.train)
    assert len(train) == 3 and len(loaders.val) == 2 and len(loaders.test) == 3  # 15, 5 and 10 pairs
    for batch in train + loaders.val + loaders.test:
        assert batch["attention_mask"].any(0).all()  # columns of padding only are dropped
        for i, (text, image_id) in enumerate(zip(batch["captions"], batch["image_ids"])):
            assert text in images[image_id].captions
            assert torch.equal(batch["pixel_values"][i], processed(images[image_id].path))
            ids = tok(text)["input_ids"]
            assert batch["input_ids"][i, :len(ids)].tolist() == ids and batch["attention_mask"][i].sum() == len(ids)
    in_order = [c for im in read_karpathy(COCO, "test") for c in im.captions]
    assert [c for b in loaders.test for c in b["captions"]] == in_order
    train_captions = [c for im in read_karpathy(COCO, ("train", "restval")) for c in im.captions]
    assert sorted(c for b in train for c in b["captions"]) == sorted(train_captions)  # restval joins train


def test_train_batches_are_reshuffled_per_epoch_and_resumable(tok):
    loaders = karpathy_loaders(COCO, tok, PROCESSOR, batch_size=5, seed=1, progress=False)
    first = [b["captions"] for b in loaders.train]
    second = [b["captions"] for b in loaders.train]
    assert first != second and sorted(c for b in first for c in b) == sorted(c for b in second for c in b)
    again = karpathy_loaders(COCO, tok, PROCESSOR, batch_size=5, seed=1, progress=False)
    again.train.load_state_dict({"epoch": 1, "position": 0})
    assert [b["captions"] for b in again.train] == second


def test_lazy_and_preloaded_images_give_the_same_batches(tok):
    images = read_karpathy(COCO, "test")
    lazy = ImageTextPairs(images, tok, PROCESSOR, preload=False)
    loaded = ImageTextPairs(images, tok, PROCESSOR, preload=True)
    index = torch.tensor([7, 0, 3, 9, 0])
    a, b = lazy.batch(index), loaded.batch(index)
    assert a.keys() == b.keys() and torch.equal(a["pixel_values"], b["pixel_values"])
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
    assert a["image_ids"] == [1, 0, 0, 1, 0]


def test_karpathy_batches_for_flickr(tok):
    (batch,) = karpathy_batches(FLICKR, "test", tok, PROCESSOR, batch_size=8)
    assert batch["captions"] == ["A white line.", "White on black."] and batch["image_ids"] == [2, 2]
    assert batch["pixel_values"].shape == (2, 3, 16, 16)


def test_loader_split_errors(tok):
    with pytest.raises(DataError, match="unknown split 'valid'"):
        karpathy_loaders(COCO, tok, PROCESSOR, batch_size=2, val_split="valid", progress=False)
    with pytest.raises(DataError, match=r"dataset_flickr30k\.json: split 'restval' has no images"):
        karpathy_loaders(FLICKR, tok, PROCESSOR, batch_size=1, train_splits=("restval",), progress=False)


def test_retrieval_task_evaluates_batches_read_from_a_karpathy_folder(tok):
    model = make_clip(vocab=len(tok), eos_token_id=tok.eos_token_id, image_size=16, patch=4)
    loaders = karpathy_loaders(COCO, tok, PROCESSOR, batch_size=5, eval_batch_size=3, progress=False)
    task = RetrievalTask(ks=(1, 2))
    metrics = task.evaluate(model, loaders.test)
    # the same numbers straight from the files: one embedding per image and per caption, keyed by image and text
    images = read_karpathy(COCO, "test")
    captions = [c for im in images for c in im.captions]
    owner = [k for k, im in enumerate(images) for _ in im.captions]
    with torch.no_grad():
        image_emb = task.encode_images(model, torch.stack([processed(im.path) for im in images]))
        text = tok(captions, padding=True, return_tensors="pt")
        text_emb = task.encode_texts(model, text["input_ids"], text["attention_mask"])
    expected = retrieval_metrics(image_emb[owner], text_emb, image_keys=owner, text_keys=captions, ks=(1, 2))
    assert set(metrics) == set(expected) | {"loss"}
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)
    # the ten captions share two gallery images (by image id), so every caption finds its image among two
    assert metrics["t2i_r2"] == 100.0


def test_retrieval_on_a_written_emoji_world(tmp_path):
    config = WorldConfig(canvas=16, min_size=6, max_size=7, max_emoji=2, min_gap=2,
                         retrieval={"train": 16, "val": 4, "test": 8}, nlvr2={"dev": 1}, vqav2={"val": 1})
    record = write_world(tmp_path, config, load_concepts(EMOJI / "emoji-test.txt", EMOJI / "en.xml"),
                         SpriteFolder(EMOJI / "sprites"), progress=False)
    tok = build_word_tokenizer(record["vocabulary"])
    processor = make_image_processor(config.canvas, record["image_mean"], record["image_std"])
    loaders = karpathy_loaders(tmp_path / "karpathy", tok, processor, batch_size=8, progress=False)
    assert len(loaders.train.data) == 16 and sum(len(b["captions"]) for b in loaders.test) == 8
    assert not any(tok.unk_token_id in b["input_ids"] for b in loaders.test)
    model = make_clip(vocab=len(tok), eos_token_id=tok.eos_token_id, image_size=16, patch=4)
    metrics = RetrievalTask(gallery_size=4).evaluate(model, loaders.test)
    assert 0.0 <= metrics["r1_mean"] <= 100.0 and metrics["loss"] > 0
