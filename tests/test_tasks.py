"""Tasks (retrieval loss and Recall@K) and the synthetic shapes world."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import CLIPModel

from comp_vlm.data.synthetic import COLOURS, PairData, SyntheticWorld, make_retrieval_loaders
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.tasks.base import Task
from comp_vlm.tasks.retrieval import RetrievalTask, batch_positives, contrastive_loss, retrieval_metrics
from comp_vlm.zoo import clip_config


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny models: two intra-op threads are no faster, and 10-80x slower while another process busies a core
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    return SyntheticWorld(image_size=16, max_objects=2, seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return build_word_tokenizer(world.vocabulary())


def tiny_clip(tok, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    cfg = clip_config(tok, vision_hidden=32, text_hidden=32, layers=2, heads=4, mlp_ratio=2, projection_dim=32,
                      image_size=16, patch_size=4, max_positions=24)
    return CLIPModel._from_config(cfg, attn_implementation="sdpa")


# -- synthetic world ------------------------------------------------------------------------------------------
def test_world_is_deterministic_by_seed(world):
    a, ca = world.sample(16, seed=3)
    b, cb = world.sample(16, seed=3)
    assert torch.equal(a, b) and ca == cb
    c, _ = world.sample(16, seed=4)
    assert not torch.equal(a, c)
    raw, _ = world.sample_raw(16, seed=3)
    assert torch.equal(world.normalise(raw), a)
    other, _ = SyntheticWorld(image_size=16, seed=1).sample_raw(16, seed=3)  # the world's seed matters too
    assert not torch.equal(raw, other)


def test_world_images_are_normalised_and_shaped(world):
    x, captions = world.sample(256, seed=5)
    assert x.shape == (256, 3, 16, 16) and x.dtype == torch.float32 and len(captions) == 256
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2
    counts = {c.count(" left of ") + 1 for c in captions}
    assert counts == {1, 2}


def test_vocabulary_covers_captions(world, tok):
    _, captions = world.sample(500, seed=7)
    used = {w for c in captions for w in c.split()}
    assert used <= set(world.vocabulary())
    assert used == set(world.vocabulary())  # and nothing listed is unused (500 samples cover all)
    ids = tok(captions, padding=True)["input_ids"]
    assert all(tok.unk_token_id not in row for row in ids)
    assert tok.batch_decode(ids, skip_special_tokens=True) == captions


def test_captions_name_objects_left_to_right(world):
    raw, captions = world.sample_raw(200, seed=11)
    rgb = torch.tensor(list(COLOURS.values()))
    checked = 0
    for img, cap in zip(raw, captions):
        words = cap.split()
        colours = [w for w in words if w in COLOURS]
        if len(colours) != 2 or colours[0] == colours[1]:
            continue
        xs = []
        for name in colours:
            near = (img - rgb[list(COLOURS).index(name)].view(3, 1, 1)).norm(dim=0) < 0.3
            assert near.any(), cap
            xs.append(near.nonzero()[:, 1].float().mean())
        assert xs[0] < xs[1], cap
        checked += 1
    assert checked > 50


def test_loaders_split_tokenize_and_resume(world, tok):
    data = make_retrieval_loaders(world, tok, n_train=96, n_val=40, n_test=40, batch_size=32, seed=0)
    again = make_retrieval_loaders(world, tok, n_train=96, n_val=40, n_test=40, batch_size=32, seed=0)
    assert [len(b["captions"]) for b in data.val] == [32, 8] and len(data.train) == 3
    for b1, b2 in zip(data.val, again.val):
        assert torch.equal(b1["pixel_values"], b2["pixel_values"]) and b1["captions"] == b2["captions"]
    # splits are different samples
    val_px = torch.cat([b["pixel_values"] for b in data.val])
    test_px = torch.cat([b["pixel_values"] for b in data.test])
    assert not torch.isclose(val_px[:, None], test_px[None]).flatten(2).all(-1).any()
    # padded to the longest caption of each batch, and the tokens decode back to the captions
    for b in data.val + data.test:
        assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long
        assert b["attention_mask"][:, -1].any()
        assert tok.batch_decode(b["input_ids"], skip_special_tokens=True) == b["captions"]
    # epochs reshuffle; the state resumes mid-epoch exactly
    epoch0 = [b["captions"] for b in data.train]
    assert data.train.state_dict() == {"epoch": 1, "position": 0}
    it = iter(data.train)
    first = next(it)["captions"]
    state = data.train.state_dict()
    assert state == {"epoch": 1, "position": 1}
    rest = [b["captions"] for b in it]
    assert first != epoch0[0]
    assert sorted(c for b in epoch0 for c in b) == sorted(first + [c for b in rest for c in b])
    again.train.load_state_dict(state)
    assert [b["captions"] for b in again.train] == rest


def test_pair_batches_pad_to_the_longest_caption_in_the_batch(tok):
    short, long = "a photo of a big red square", "a photo of a big red square left of a small blue circle"
    data = PairData(torch.zeros(2, 3, 4, 4), [short, long], tok)
    assert data.input_ids.shape == (2, 15)
    b = data.batch(torch.tensor([0]))
    assert b["input_ids"].shape == (1, 9) and b["attention_mask"].all() and b["captions"] == [short]
    assert data.batch(torch.tensor([1, 0]))["input_ids"].shape == (2, 15)


# -- retrieval metrics on hand-made embeddings ----------------------------------------------------------------
def test_metrics_perfect_and_permuted():
    e = torch.eye(6)
    perfect = retrieval_metrics(e, e.clone())
    assert all(v == 100.0 for v in perfect.values()) and set(perfect) >= {"i2t_r1", "t2i_r10", "r1_mean"}
    # texts 2 and 3 swapped: with one-hot vectors the true text scores 0 like every other wrong one; ties count
    # against the query, so both miss at any k below the gallery size
    swapped = e[[0, 1, 3, 2, 4, 5]]
    m = retrieval_metrics(e, swapped, ks=(1, 5, 6))
    assert m["i2t_r1"] == pytest.approx(400 / 6) and m["t2i_r1"] == pytest.approx(400 / 6)
    assert m["i2t_r5"] == pytest.approx(400 / 6) and m["i2t_r6"] == 100.0
    # graded similarity: image i and text j at angles i/4 and (j + 0.7)/4, so text i - 1 beats text i for
    # every image but the first (and image j + 1 beats image j for every text but the last): all at rank 2
    pos = torch.arange(6.0)
    img = torch.stack([torch.cos(pos / 4), torch.sin(pos / 4)], 1)
    txt = torch.stack([torch.cos((pos + 0.7) / 4), torch.sin((pos + 0.7) / 4)], 1)
    m = retrieval_metrics(img, txt, ks=(1, 2))
    assert m["i2t_r1"] == pytest.approx(100 / 6) and m["t2i_r1"] == pytest.approx(100 / 6)
    assert m["i2t_r2"] == 100.0 and m["t2i_r2"] == 100.0
    assert m["r1_mean"] == pytest.approx((m["i2t_r1"] + m["t2i_r1"]) / 2)


def test_metrics_count_duplicate_captions():
    # images 0 and 1 share the caption "a"; the text embedding of "a" is nearest image 1
    img = torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.0], [0.0, 0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    captions = ["a", "a", "b"]
    m = retrieval_metrics(img, txt, text_keys=captions)
    assert m["i2t_r1"] == 100.0 and m["t2i_r1"] == 100.0
    # without caption keys the two identical "a" texts are different items: images 0 and 1 each tie with the
    # other's text (ties count against), and text 0 retrieves image 1 first
    naive = retrieval_metrics(img, txt)
    assert naive["i2t_r1"] == pytest.approx(100 / 3) and naive["t2i_r1"] == pytest.approx(200 / 3)
    assert naive["r1_mean"] == pytest.approx(50.0)
    # a caption on the wrong side is still missed
    m = retrieval_metrics(img, txt, text_keys=["a", "b", "b"])
    assert m["i2t_r1"] < 100.0


def test_metrics_group_images_by_id():
    # COCO-style: image "x" appears with two different captions; both captions retrieve it
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9]])
    m = retrieval_metrics(img, txt, image_keys=["x", "x", "y"], text_keys=["c1", "c2", "c3"], ks=(1,))
    assert m == {"i2t_r1": 100.0, "t2i_r1": 100.0, "r1_mean": 100.0}


def test_contrastive_loss_uses_duplicate_positives():
    e = torch.eye(3)[[0, 0, 1, 2]]  # pairs 0 and 1 share a caption and an embedding
    batch = {"captions": ["a", "a", "b", "c"]}
    pos = batch_positives(batch, 4)
    assert pos is not None and pos[0, 1] and not pos[0, 2]
    same, apart = e, torch.eye(4)[[0, 3, 1, 2]]  # duplicates embedded alike / pushed apart
    # embedded alike: each duplicate row's target is split over two equal logits -> entropy log 2 on 2 of 4 rows
    assert contrastive_loss(same, same, 50.0, pos).item() == pytest.approx(math.log(2) / 2, abs=1e-4)
    assert contrastive_loss(apart, apart, 50.0, pos).item() > 10  # the aware loss penalises pushing apart
    assert contrastive_loss(apart, apart, 50.0).item() < 1e-3  # the plain loss rewards it
    assert contrastive_loss(e, e[[1, 0, 3, 2]], 50.0, pos).item() > 10


class DualEncoder(torch.nn.Module):
    """A transformers-4.x-style model: ``get_*_features`` return tensors."""

    def __init__(self, vocab: int = 20) -> None:
        super().__init__()
        self.img = torch.nn.Linear(3 * 16 * 16, 8)
        self.txt = torch.nn.EmbeddingBag(vocab, 8, mode="sum")
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def get_image_features(self, pixel_values):
        return self.img(pixel_values.flatten(1))

    def get_text_features(self, input_ids, attention_mask=None):
        return self.txt(input_ids, per_sample_weights=attention_mask.float())


def test_task_reads_tensor_features_and_tensor_image_ids(world, tok):
    data = make_retrieval_loaders(world, tok, n_train=32, n_val=16, n_test=24, batch_size=8, seed=2)
    model, task = DualEncoder(len(tok)), RetrievalTask(ks=(1, 5))
    loss = task.loss(model, data.val[0])
    loss.backward()
    assert model.logit_scale.grad is not None and model.img.weight.grad.abs().sum() > 0
    # every image appears twice in the eval data (tensor image ids): the image gallery is de-duplicated
    doubled = [{k: v for k, v in b.items() if k != "match_keys"}
               | {"image_ids": torch.arange(i * 8, i * 8 + len(b["captions"])) % 12} for i, b in enumerate(data.test)]
    e = task.embed(model, doubled)
    assert len(set(e["image_keys"])) == 12 and all(isinstance(k, int) for k in e["image_keys"])
    m = task.evaluate(model, doubled)
    assert set(m) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "r1_mean", "loss"}
    with pytest.raises(TypeError):
        RetrievalTask.encode_images(type("M", (), {"get_image_features": lambda self, **kw: (1, 2)})(), None)


# -- the task on a tiny CLIP ----------------------------------------------------------------------------------
def test_task_batch_to_and_protocol():
    assert issubclass(RetrievalTask, Task) and RetrievalTask.primary_metric == "r1_mean"
    b = {"pixel_values": torch.zeros(2, 3), "captions": ["x", "y"]}
    moved = Task.batch_to(b, "meta")
    assert moved["pixel_values"].device.type == "meta" and moved["captions"] == ["x", "y"]
    assert b["pixel_values"].device.type == "cpu"
    with pytest.raises(TypeError):
        Task()  # abstract


def test_validation_loss_restores_mode_and_is_deterministic(world, tok):
    data = make_retrieval_loaders(world, tok, n_train=32, n_val=48, n_test=16, batch_size=16, seed=1)
    model, task = tiny_clip(tok), RetrievalTask()
    model.train()
    model.text_model.eval()  # mixed states survive too
    v1 = task.validation_loss(model, data.val)
    assert model.training and model.vision_model.training and not model.text_model.training
    model.eval()
    v2 = task.validation_loss(model, data.val)
    assert not model.training and v1 == v2 and math.isfinite(v1)
    assert all(p.grad is None for p in model.parameters())
    expected = sum(task.loss(model, b).item() for b in data.val) / len(data.val)
    assert v1 == pytest.approx(expected, rel=1e-5)

    seen = []

    class Spy(RetrievalTask):
        def loss(self, model, batch):
            seen.append((torch.is_grad_enabled(), model.training, model.vision_model.training))
            return super().loss(model, batch)

    model.train()
    Spy().validation_loss(model, data.val)
    assert seen == [(False, False, False)] * len(data.val) and model.training


def test_tiny_clip_trains_and_evaluates(world, tok):
    data = make_retrieval_loaders(world, tok, n_train=512, n_val=64, n_test=128, batch_size=32, seed=0)
    model, task = tiny_clip(tok), RetrievalTask()
    before = task.evaluate(model, data.test)
    assert set(before) >= {"r1_mean", "loss", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"}
    assert all(0.0 <= before[k] <= 100.0 for k in before if k != "loss")
    val0 = task.validation_loss(model, data.val)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    steps = 0
    while steps < 60:
        for batch in data.train:
            loss = task.loss(model, task.batch_to(batch, "cpu"))
            assert loss.dim() == 0 and torch.isfinite(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps == 60:
                break
    assert model.training
    val1 = task.validation_loss(model, data.val)
    assert val1 < 0.8 * val0, (val0, val1)
    after = task.evaluate(model, data.test)
    assert model.training
    assert after["loss"] < before["loss"] and after["r1_mean"] > before["r1_mean"], (before, after)


def test_benchmark_world_shapes_lengths_and_determinism():
    from comp_vlm.data.synthetic import FILLERS, BenchmarkWorld

    world = BenchmarkWorld(seed=3)
    px, caps = world.sample(300, seed=1)
    px2, caps2 = world.sample(300, seed=1)
    assert torch.equal(px, px2) and caps == caps2
    assert px.shape == (300, 3, 32, 32)
    tok = build_word_tokenizer(world.vocabulary())
    lengths = [len(tok(c)["input_ids"]) for c in caps]
    assert min(lengths) >= 12 and max(lengths) <= 20
    assert all(i != tok.unk_token_id for c in caps for i in tok(c)["input_ids"])
    counts = [c.count(" then ") + 1 for c in caps]
    assert set(counts) == {2, 3, 4}
    assert any(w in FILLERS for c in caps for w in c.split())
    assert 0.3 < len(set(caps)) / len(caps) <= 1.0


def test_benchmark_world_content_keys_drop_fillers():
    from comp_vlm.data.synthetic import FILLERS, BenchmarkWorld

    world = BenchmarkWorld(seed=3)
    px, caps, keys = world.sample_keyed(200, seed=1)
    assert torch.equal(px, world.sample(200, seed=1)[0])
    for cap, key in zip(caps, keys):
        assert cap.startswith("a photo showing " + key)  # the objects, in caption order
        assert not set(key.split()) & set(FILLERS)
    assert len(set(keys)) < len(set(caps))  # some scenes differ only by fillers: the keys tie them


def test_match_keys_override_captions_in_loss_and_metrics():
    from comp_vlm.tasks.retrieval import batch_positives, gallery_metrics

    batch = {"captions": ["x one", "x two", "y"], "match_keys": ["x", "x", "y"]}
    pos = batch_positives(batch, 3)
    assert pos.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    # image 0 is nearest text 1: wrong by caption, right by content
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [-1.0, 0.1]])
    by_caption = gallery_metrics(img, txt, list(range(3)), batch["captions"], ks=(1,))
    by_content = gallery_metrics(img, txt, batch["match_keys"], batch["match_keys"], ks=(1,))
    assert by_caption["i2t_r1"] == pytest.approx(100 / 3) and by_content["i2t_r1"] == 100.0


def test_gallery_metrics_average_fixed_size_galleries():
    from comp_vlm.tasks.retrieval import gallery_metrics

    torch.manual_seed(0)
    img, txt = torch.randn(10, 4), torch.randn(10, 4)
    keys = list(range(10))
    parts = [retrieval_metrics(img[i:i + 4], txt[i:i + 4], keys[i:i + 4], keys[i:i + 4]) for i in (0, 4)]
    got = gallery_metrics(img, txt, keys, keys, gallery_size=4)  # pairs 8, 9 are left out
    assert got["r1_mean"] == pytest.approx((parts[0]["r1_mean"] + parts[1]["r1_mean"]) / 2)
    assert got == gallery_metrics(img[:8], txt[:8], keys[:8], keys[:8], gallery_size=4)
    assert gallery_metrics(img, txt, keys, keys) == retrieval_metrics(img, txt, keys, keys)
    with pytest.raises(ValueError, match="cannot fill one gallery"):
        gallery_metrics(img, txt, keys, keys, gallery_size=11)
    with pytest.raises(ValueError, match="gallery_size"):
        RetrievalTask(gallery_size=1)


def test_statements_are_half_true_and_false_ones_change_one_attribute():
    from comp_vlm.data.synthetic import ORDINALS, BenchmarkWorld, mix_seed, sample_statements

    world = BenchmarkWorld(seed=2)
    px, statements, labels = sample_statements(world, 400, seed=5)
    px2, statements2, labels2 = sample_statements(world, 400, seed=5)
    assert torch.equal(px, px2) and statements == statements2 and torch.equal(labels, labels2)
    assert px.shape == (400, 3, 32, 32) and 0.4 < labels.float().mean() < 0.6
    # the same images as the captions of that scene draw: check each statement against the scene's objects
    g = torch.Generator().manual_seed(mix_seed(world.seed, "statements", 5))
    scenes, _ = world._scenes_and_pixels(400, g)
    objects = [o.split(" then ") for o in world.objects(scenes)]
    for objs, text, label in zip(objects, statements, labels.tolist()):
        ordinal, claim = text.removeprefix("the ").split(" object from the left is a ")
        truth = objs[ORDINALS.index(ordinal)]
        differing = sum(a != b for a, b in zip(claim.split(), truth.split()))
        assert differing == (0 if label else 1), (text, truth, label)


def test_questions_have_one_word_answers_from_the_scene():
    from comp_vlm.data.synthetic import BenchmarkWorld, sample_questions, task_vocabulary

    world = BenchmarkWorld(seed=2)
    px, questions, answers = sample_questions(world, 300, seed=1)
    assert px.shape[0] == len(questions) == len(answers) == 300
    assert {a for q, a in zip(questions, answers) if q.startswith("how many")} <= {"two", "three", "four"}
    assert {a for q, a in zip(questions, answers) if "colour" in q} <= set(world.colours)
    assert {a for q, a in zip(questions, answers) if "shape" in q} <= set(world.shapes)
    vocab = set(task_vocabulary(world))
    assert all(w in vocab for text in questions + answers for w in text.split())
    assert sample_questions(world, 300, seed=1)[1] == questions
