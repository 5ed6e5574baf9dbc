"""Every ```python and ```sh block of README.md runs as pasted: in order, each in a fresh namespace (or shell), in one
temporary directory holding a tiny CLIP at ``path/to/clip``, a tiny Karpathy-format directory at ``path/to/coco``
and ``photo.jpg``. A block is skipped only when the line before it is ``<!-- readme-test: skip, needs ... -->``;
the quickstart's and the Python API's blocks may not be."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)
SKIP = re.compile(r"<!-- readme-test: skip, (needs [^>]+?) -->\s*$")
UNSKIPPABLE = ("Quickstart", "Python API")  # sections (## headings) whose blocks must run
RUN = ("python", "sh")


def readme_blocks(text: str) -> list[dict]:
    """The fenced blocks of ``text``: language, code, the ## section they are in, and the skip reason if any."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").splitlines()
        sections = [line[3:] for line in before if line.startswith("## ")]
        skip = SKIP.match(before[-1]) if before else None
        blocks.append({"lang": match.group(1), "code": match.group(2), "section": sections[-1] if sections else "",
                       "skip": skip.group(1) if skip else None, "line": len(before) + 1})
    return blocks


def make_fixtures(root: Path) -> None:
    """A random-weight CLIP (3+3 layers, 16-d, 16-px images) with a word tokenizer and image processor, and a
    Karpathy-format COCO directory of the synthetic world's pictures (36 train, 4 restval, 8 val, 8 test images,
    one caption each), under the paths the README names."""
    from transformers import CLIPModel

    from comp_vlm.data.processor import ProcessorWorld, to_pil
    from comp_vlm.data.text import build_word_tokenizer
    from comp_vlm.zoo import clip_config

    world = ProcessorWorld(image_size=16, max_objects=1, seed=0)
    coco, images = root / "path" / "to" / "coco", []
    for split, n in {"train": 36, "restval": 4, "val": 8, "test": 8}.items():
        folder = "train2014" if split == "train" else "val2014"
        (coco / folder).mkdir(parents=True, exist_ok=True)
        pixels, captions = world.sample_raw(n, seed=len(images))
        for picture, caption in zip(to_pil(pixels), captions):
            i = len(images)
            name = f"COCO_{folder}_{i:012d}.jpg"
            picture.save(coco / folder / name, quality=95)
            images.append({"filepath": folder, "filename": name, "split": split, "imgid": i, "cocoid": i,
                           "sentids": [i], "sentences": [{"raw": caption, "imgid": i, "sentid": i,
                                                          "tokens": caption.split()}]})
    (coco / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))
    to_pil(world.sample_raw(1, seed=999)[0])[0].save(root / "photo.jpg")
    tokenizer = build_word_tokenizer(world.vocabulary(), model_max_length=24)
    config = clip_config(tokenizer, vision_hidden=16, text_hidden=16, layers=3, heads=2, projection_dim=16,
                         image_size=16, patch_size=4, max_positions=24)
    torch.manual_seed(0)
    clip = root / "path" / "to" / "clip"
    CLIPModel(config).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    world.image_processor().save_pretrained(clip)


BLOCKS = [b for b in readme_blocks(README.read_text()) if b["lang"] in RUN]


def test_the_readme_has_runnable_blocks_and_skips_only_for_missing_data():
    sections = {b["section"].split(":")[0] for b in BLOCKS if not b["skip"]}
    assert set(UNSKIPPABLE) <= sections
    skipped = [b["line"] for b in BLOCKS if b["skip"] and b["section"].startswith(UNSKIPPABLE)]
    assert not skipped, f"README.md lines {skipped}: quickstart and Python API blocks may not be skipped"


def test_block_parsing_sees_marks_and_sections():
    text = "## A\n```python\nx = 1\n```\n## B: c\n<!-- readme-test: skip, needs the Hub -->\n```sh\nls\n```\n```\nno\n```\n"
    found = readme_blocks(text)
    assert [(b["lang"], b["section"], b["skip"], b["line"]) for b in found] == [
        ("python", "A", None, 2), ("sh", "B: c", "needs the Hub", 7), ("", "B: c", None, 10)]
    assert found[0]["code"] == "x = 1\n"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("readme")
    make_fixtures(root)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.parametrize("block", BLOCKS, ids=[f"line{b['line']}-{b['lang']}" for b in BLOCKS])
def test_readme_block_runs(block, workdir):
    if block["skip"]:
        pytest.skip(block["skip"])
    if block["lang"] == "sh":  # comp-vlm is this checkout's CLI under this interpreter
        command = ["bash", "-c", f'set -e\ncomp-vlm() {{ "{sys.executable}" -m comp_vlm.cli "$@"; }}\n{block["code"]}']
    else:  # a fresh interpreter: a fresh namespace, nothing imported by the tests before
        command = [sys.executable, "-c", block["code"]]
    proc = subprocess.run(command, check=False, cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"README.md:{block['line']}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
