"""``comp_vlm.evaluate_dir`` and ``bench_dir``: ``comp-vlm eval`` and ``bench`` as functions."""

from __future__ import annotations

import json

import pytest
from test_cli import dense_dir  # noqa: F401  (fixture)
from test_io import pruned_model

import comp_vlm
from comp_vlm.cli import main


def test_evaluate_dir_returns_what_eval_writes(dense_dir, tmp_path, capsys):  # noqa: F811
    result = comp_vlm.evaluate_dir(dense_dir, data="synthetic", n_test=32, gallery_size=0)
    assert not result["pruned"] and result["flops"] == result["dense_flops"] and result["one_gallery"]
    assert result["n"] == result["gallery_size"] == result["images"] == 32
    path = tmp_path / "eval.json"
    assert main(["eval", str(dense_dir), "--data", "synthetic", "--n-test", "32", "--gallery-size", "0", "--json", str(path), "-q"]) == 0
    assert "synthetic test split: 32 pairs (one gallery), seed 0" in capsys.readouterr().out
    written = json.loads(path.read_text())
    assert written.pop("eval_seconds") >= 0
    assert written == json.loads(json.dumps({k: v for k, v in result.items() if k != "eval_seconds"}))


def test_bench_dir_times_every_batch_size_and_text_length(tmp_path, tokenizer):
    model = pruned_model()
    out = comp_vlm.save_pruned(model, tmp_path / "m", tokenizer=tokenizer)
    result = comp_vlm.bench_dir(out, batch_sizes=(1, 3), text_lengths=(4, 6), repeats=1, warmup=0)
    assert [(r["batch"], r["text_length"]) for r in result["results"]] == [(1, 4), (1, 6), (3, 4), (3, 6)]
    for r in result["results"]:
        reference = {"image_size": result["image_size"], "text_length": r["text_length"]}
        assert r["pruned"]["flops"] == comp_vlm.count_flops(model, reference) < r["dense"]["flops"]
        assert r["speedup"] == pytest.approx(r["dense"]["latency_ms"] / r["pruned"]["latency_ms"])
    assert result["pruned_params"] == comp_vlm.count_params(model) < result["dense_params"]
    with pytest.raises(comp_vlm.ConfigError, match="max_position_embeddings"):
        comp_vlm.bench_dir(out, text_lengths=(25,), repeats=1)
