"""Dense training cache: a second call loads identical weights instead of training again."""

from __future__ import annotations

import torch
from transformers import CLIPModel

from comp_vlm.data.synthetic import SyntheticWorld, make_retrieval_loaders
from comp_vlm.data.text import build_word_tokenizer
from comp_vlm.dense import DenseTraining, cached_dense, load_cached_weights, lr_at, save_cached_weights
from comp_vlm.tasks import RetrievalTask
from comp_vlm.zoo import clip_config


def test_lr_schedule():
    t = DenseTraining(steps=100, lr=1.0, warmup=10)
    assert lr_at(0, t) == 0.1 and lr_at(9, t) == 1.0 and abs(lr_at(100, t)) < 1e-12
    assert abs(lr_at(55, t) - 0.5) < 1e-9


def tiny_setup():
    world = SyntheticWorld(image_size=16, seed=0)
    tok = build_word_tokenizer(world.vocabulary())
    data = make_retrieval_loaders(world, tok, 64, 32, 32, 16, seed=0)
    cfg = clip_config(tok, vision_hidden=32, text_hidden=32, layers=2, heads=4, mlp_ratio=2, projection_dim=16,
                      image_size=16, patch_size=4, max_positions=24)
    return cfg, data


def test_cache_round_trip(tmp_path):
    cfg, data = tiny_setup()
    training = DenseTraining(steps=6, warmup=2)
    first, m1 = cached_dense(CLIPModel._from_config, cfg, RetrievalTask(), data.train, data.val, training, "w0",
                             tmp_path, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".safetensors")
    second, m2 = cached_dense(CLIPModel._from_config, cfg, RetrievalTask(), data.train, data.val, training, "w0",
                              tmp_path, progress=False)
    assert m1 == m2
    for (k, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k
    data.train.load_state_dict({"epoch": 1, "position": 2})
    _, _ = cached_dense(CLIPModel._from_config, cfg, RetrievalTask(), data.train, data.val,
                            DenseTraining(steps=7, warmup=2), "w0", tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 4  # another training setting, another entry
    assert data.train.state_dict() == {"epoch": 1, "position": 2}  # training left the loader where it was



def test_unreadable_cache_entry_is_retrained(tmp_path, caplog):
    cfg, data = tiny_setup()
    training = DenseTraining(steps=4, warmup=1)
    first, m1 = cached_dense(CLIPModel._from_config, cfg, RetrievalTask(), data.train, data.val, training, "w0",
                             tmp_path, progress=False)
    weights = next(tmp_path.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with caplog.at_level("WARNING", logger="comp_vlm"):
        again, m2 = cached_dense(CLIPModel._from_config, cfg, RetrievalTask(), data.train, data.val, training, "w0",
                                 tmp_path, progress=False)
    assert "unreadable cached dense weights" in caplog.text
    assert m1 == m2  # retrained from the same seed: the same model
    for (k, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert weights.stat().st_size > 100  # and cached again


def test_cache_entry_that_does_not_fit_leaves_the_model_untouched(tmp_path, caplog):
    cfg, _ = tiny_setup()
    torch.manual_seed(0)
    model = CLIPModel._from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = CLIPModel._from_config(cfg)
    with torch.no_grad():
        other.text_projection.weight = torch.nn.Parameter(torch.zeros(8, 32))  # a foreign shape, saved last
    save_cached_weights(tmp_path / "w.safetensors", other, {})
    with caplog.at_level("WARNING", logger="comp_vlm"):
        assert not load_cached_weights(tmp_path / "w.safetensors", model)
    assert "do not fit the model (text_projection.weight)" in caplog.text
    for k, v in model.state_dict().items():  # nothing was copied, not even the tensors that fit
        assert torch.equal(v, before[k]), k
    assert load_cached_weights(tmp_path / "w.safetensors", other)  # the same file fits its own model


def test_progress_bar_ends_on_the_last_steps_loss(monkeypatch):
    from comp_vlm import dense, training

    losses, shown = [], []
    real = training.training_loss

    def recording(*args, **kwargs):
        loss = real(*args, **kwargs)
        losses.append(loss.item())
        return loss

    class Bar:
        def __init__(self, iterable, **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def set_postfix(self, **kwargs):
            shown.append(kwargs["loss"])

    monkeypatch.setattr(training, "training_loss", recording)
    monkeypatch.setattr(dense, "tqdm", Bar)
    cfg, data = tiny_setup()
    torch.manual_seed(0)
    dense.train_dense(CLIPModel._from_config(cfg), RetrievalTask(), data.train, DenseTraining(steps=3, warmup=1))
    assert len(losses) == 3 and shown[-1] == f"{losses[-1]:.3f}"
