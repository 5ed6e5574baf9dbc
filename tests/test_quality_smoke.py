"""The quality suite end to end on its smoke bench (tiny model, data and steps): the sanity arms run and record
what the report and the pairing need."""

from __future__ import annotations

import json

import pytest
from quality_suite import run

RATIOS = (0.5, 0.7, 0.8, 0.85)


@pytest.mark.slow
def test_sanity_arms_run_on_the_smoke_bench(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the dense cache goes to ./cache
    out = tmp_path / "results"
    assert run.main(["--smoke", "--strategies", "sjp-random,downsample", "--seeds", "0", "--control-seeds", "",
                   "--out", str(out)]) == 0
    records = json.loads((out / "quality.json").read_text())
    assert sorted({(r["arm"], r["ratio"]) for r in records}) == sorted(
        (arm, r) for arm in ("downsample", "sjp-random") for r in RATIOS)
    assert all(r["config"]["token_scorer"] == "random" for r in records if r["arm"] == "sjp-random")
    down = [r for r in records if r["arm"] == "downsample"]
    size = down[0]["downsample"]["image_size"]
    assert size < 32 and size % 4 == 0 and all(r["downsample"]["image_size"] == size for r in down)
    for r in records:
        if r["reached"]:  # every reached ratio keeps at most its share of the full-resolution dense FLOPs
            assert r["flops_kept"] <= 1 - r["ratio"] + 0.01, r
    assert (out / "quality.md").is_file()
