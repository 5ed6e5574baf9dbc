"""The emoji world: scenes of real emoji pictures named by human-written CLDR names, written to disk as a COCO-style
Karpathy retrieval set, an NLVR2 reasoning set and a VQAv2 question set, to be read back through the same readers
(:mod:`~comp_vlm.data.karpathy`, :mod:`~comp_vlm.data.nlvr2`, :mod:`~comp_vlm.data.vqav2`) a real copy goes through.

A scene is a ``canvas x canvas`` image holding ``min_emoji..max_emoji`` distinct emoji, each ``min_size..max_size``
pixels on its longer side, at random non-overlapping positions on a random colour with Gaussian noise. Objects are
ordered left to right by the centres of their boxes (at least ``min_gap`` pixels apart). Every image comes with its
alpha mask (``masks/`` mirrors the image folders, 8-bit PNG): the foreground share of each patch, the ground truth for
token redundancy, is :func:`patch_foreground` of it.

- Retrieval (``karpathy/dataset_emoji.json``, ``karpathy/images/``): the caption names the emoji left to right, joined
  by "and", each by its CLDR name or, with probability ``keyword_rate``, one of its CLDR keywords.
- Reasoning (``nlvr2/data/<split>.json``, ``nlvr2/images/<split>/``): a statement about two scenes, true or false
  with equal odds: "the left image shows A and B, the right image shows C" (a false one changes one name to an
  emoji of the same subgroup absent from that image) or "the left image shows two emoji, the right image shows one
  emoji" (a false one changes one count).
- VQA (``vqav2/``): per image ``questions_per_image`` questions of distinct kinds -- what (the n-th emoji from the
  left), which side (of the leftmost or rightmost emoji), how many, yes/no (a present emoji, or an absent one of the
  same subgroup) -- with ten answers each, stored normalised as the official evaluation compares them; a "what"
  answer is the name, or a keyword with probability ``keyword_rate`` per annotator.

Everything is determined by the sources and :class:`WorldConfig` (each item draws from its own generator seeded by
``(seed, dataset, split, index)``). ``world.json`` records the settings, the source files' sha256, the concepts, the
vocabulary, the training images' mean/std and the measured background share of patches.

    python -m comp_vlm.data.emoji_world data/emoji-world      # needs the three Debian packages (see emoji_sources)
    python -m comp_vlm.data.emoji_world data/emoji-world --workers 16   # 16 processes, the same files byte for byte
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..errors import ConfigError, DataError
from .emoji_sources import (
    CLDR_PATH,
    EMOJI_TEST_PATH,
    FONT_PATH,
    Concept,
    FontGlyphs,
    GlyphSource,
    SpriteFolder,
    file_digest,
    load_concepts,
)
from .files import PathLike, read_json, write_json
from .karpathy import CaptionedImage, caption_vocabulary, write_karpathy
from .nlvr2 import NLVR2Example, write_nlvr2
from .synthetic import mix_seed
from .vqa_eval import normalize_answer
from .vqav2 import VQAQuestion, image_file_name, most_common_answer, write_vqav2

WORLD_FORMAT = "comp-vlm emoji world 1"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")
COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
LICENCE_NOTE = """The images of this world are drawn from Noto Color Emoji glyphs (Debian fonts-noto-color-emoji),
licensed under the SIL Open Font License 1.1 (https://openfontlicense.org). Names and keywords come from the Unicode
CLDR annotations (unicode-cldr-core) and emoji-test.txt (unicode-data), under the Unicode License
(https://www.unicode.org/license.txt).
"""


@dataclass(frozen=True)
class WorldConfig:
    """What shapes the world. Split sizes count images (retrieval, VQA) or statements (NLVR2)."""

    canvas: int = 40
    patch: int = 4  # the patch size of the recorded background statistics
    min_emoji: int = 1
    max_emoji: int = 3
    min_size: int = 12
    max_size: int = 18
    min_gap: int = 3  # least distance between two emoji centres along x, so left-to-right order is visible
    noise: float = 20.0  # std of the background noise, in 8-bit levels
    keyword_rate: float = 0.1
    max_code_points: int | None = 2  # concepts with at most this many code points (None: ZWJ sequences too)
    include_flags: bool = False
    max_concepts: int | None = None  # a seeded subset of the concepts (None: all)
    seed: int = 0
    captions_per_image: int = 1
    questions_per_image: int = 3
    retrieval: dict[str, int] = field(default_factory=lambda: {"train": 30000, "val": 1000, "test": 5000})
    nlvr2: dict[str, int] = field(default_factory=lambda: {"train": 6000, "dev": 500, "test1": 500})
    vqav2: dict[str, int] = field(default_factory=lambda: {"train": 6000, "val": 1000})

    def __post_init__(self) -> None:
        if not 1 <= self.min_emoji <= self.max_emoji <= len(ORDINALS):
            raise ConfigError(f"need 1 <= min_emoji <= max_emoji <= {len(ORDINALS)}")
        if not 4 <= self.min_size <= self.max_size <= self.canvas:
            raise ConfigError("need 4 <= min_size <= max_size <= canvas")
        if self.canvas % self.patch:
            raise ConfigError(f"canvas {self.canvas} is not a multiple of patch {self.patch}")
        if not 0.0 <= self.keyword_rate <= 1.0 or self.captions_per_image < 1 \
                or not 1 <= self.questions_per_image <= 4:
            raise ConfigError("need keyword_rate in [0, 1], captions_per_image >= 1, questions_per_image in 1..4")

    def scaled(self, factor: float) -> WorldConfig:
        """The same world with every split ``factor`` times as large (at least one item each)."""
        def scale(sizes: dict[str, int]) -> dict[str, int]:
            return {k: max(1, round(v * factor)) for k, v in sizes.items()}

        return WorldConfig(**{**asdict(self), "retrieval": scale(self.retrieval), "nlvr2": scale(self.nlvr2),
                              "vqav2": scale(self.vqav2)})


# -- pictures ---------------------------------------------------------------------------------------------------
def render_sprites(concepts: Sequence[Concept], glyphs: GlyphSource, progress: bool = False) -> list[Any]:
    """Each concept's picture (RGBA, cropped to its alpha)."""
    return [glyphs.sprite(c) for c in tqdm(concepts, desc="glyphs", disable=not progress)]


def first_distinct(sprites: Sequence[Any]) -> list[int]:
    """Indices of the sprites no earlier sprite equals pixel for pixel (the font draws some emoji alike: territories
    sharing a flag, "family" and "family: man, man, boy"), so no two names share one picture."""
    seen: set[tuple[tuple[int, int], bytes]] = set()
    keep = []
    for i, sprite in enumerate(sprites):
        key = (sprite.size, sprite.tobytes())
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


class SpriteBank:
    """Sprites (one per concept, in concept order), resized on demand to a longer side of ``size`` pixels (cached)."""

    def __init__(self, sprites: Sequence[Any]) -> None:
        self.base = list(sprites)
        self._cache: dict[tuple[int, int], Any] = {}

    def shape(self, concept: int, size: int) -> tuple[int, int]:
        """(width, height) of the concept's sprite at ``size``."""
        w, h = self.base[concept].size
        scale = size / max(w, h)
        return max(1, round(w * scale)), max(1, round(h * scale))

    def sprite(self, concept: int, size: int) -> Any:
        key = (concept, size)
        if key not in self._cache:
            from PIL import Image

            self._cache[key] = self.base[concept].resize(self.shape(concept, size), Image.Resampling.LANCZOS)
        return self._cache[key]


@dataclass(frozen=True)
class Placement:
    concept: int  # index into the world's concepts
    size: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[Placement, ...]  # left to right
    background: tuple[int, int, int]
    noise_seed: int


def _clash(a: tuple[int, ...], b: tuple[int, ...], min_gap: int) -> bool:
    overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
    return overlap or abs((a[0] + a[2]) - (b[0] + b[2])) < 2 * min_gap


def sample_scene(rng: np.random.Generator, bank: SpriteBank, n_concepts: int, config: WorldConfig,
                 count: int | None = None, tries: int = 200, positions: int = 20) -> Scene:
    """A random scene of ``count`` (default: random) distinct concepts at non-clashing positions: each emoji gets
    ``positions`` random positions to fit among those already placed; failing that, the scene starts again with new
    sizes, up to ``tries`` times."""
    count = int(rng.integers(config.min_emoji, config.max_emoji + 1)) if count is None else count
    concepts = rng.choice(n_concepts, size=count, replace=False).tolist()
    for _ in range(tries):
        placed: list[Placement] = []
        for c in concepts:
            size = int(rng.integers(config.min_size, config.max_size + 1))
            w, h = bank.shape(c, size)
            for _ in range(positions):
                x, y = int(rng.integers(0, config.canvas - w + 1)), int(rng.integers(0, config.canvas - h + 1))
                box = (x, y, x + w, y + h)
                if not any(_clash(box, p.box, config.min_gap) for p in placed):
                    placed.append(Placement(c, size, box))
                    break
            else:
                break
        else:
            background = tuple(int(v) for v in rng.integers(30, 226, size=3))
            return Scene(tuple(sorted(placed, key=lambda p: p.centre_x)), background,  # type: ignore[arg-type]
                         int(rng.integers(2**63 - 1)))
    raise ConfigError(f"cannot place {count} emoji of {config.min_size}-{config.max_size} px on a "
                      f"{config.canvas} px canvas in {tries} tries: use a larger canvas or smaller emoji")


def render_scene(scene: Scene, bank: SpriteBank, config: WorldConfig) -> tuple[Any, np.ndarray]:
    """The scene as an RGB PIL image and its alpha mask ``(canvas, canvas)`` uint8 (255 = opaque emoji)."""
    from PIL import Image

    s = config.canvas
    noise = np.random.default_rng(scene.noise_seed).normal(0.0, config.noise, (s, s, 3))
    pixels = np.clip(np.rint(np.asarray(scene.background, dtype=np.float64) + noise), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert("RGBA")
    alpha = np.zeros((s, s), dtype=np.uint8)
    for obj in scene.objects:
        sprite = bank.sprite(obj.concept, obj.size)
        x0, y0, x1, y1 = obj.box
        image.alpha_composite(sprite, dest=(x0, y0))
        np.maximum(alpha[y0:y1, x0:x1], np.asarray(sprite.getchannel("A")), out=alpha[y0:y1, x0:x1])
    return image.convert("RGB"), alpha


def patch_foreground(alpha: np.ndarray, patch: int) -> np.ndarray:
    """``(H/patch, W/patch)`` foreground share of each patch (mean alpha in ``[0, 1]``), row-major like ViT patches."""
    h, w = alpha.shape
    if h % patch or w % patch:
        raise ConfigError(f"a {w}x{h} mask does not split into {patch}-pixel patches")
    return alpha.reshape(h // patch, patch, w // patch, patch).astype(np.float64).mean(axis=(1, 3)) / 255.0


def mask_path(dataset_root: PathLike, image_path: PathLike) -> Path:
    """The mask of an image of a world dataset: ``<root>/masks/<the image's path under root>``."""
    root = Path(dataset_root)
    return root / "masks" / Path(image_path).relative_to(root)


def read_mask(path: PathLike) -> np.ndarray:
    """An alpha mask written with the world, ``(H, W)`` uint8."""
    from PIL import Image

    if not Path(path).is_file():
        raise DataError(f"{path}: missing mask")
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


# -- words ------------------------------------------------------------------------------------------------------
def mention(concept: Concept, rng: np.random.Generator, keyword_rate: float) -> str:
    """The concept's name, or with probability ``keyword_rate`` one of its keywords (when it has any)."""
    if concept.keywords and rng.random() < keyword_rate:
        return concept.keywords[int(rng.integers(len(concept.keywords)))]
    return concept.name


def caption(scene: Scene, concepts: Sequence[Concept], rng: np.random.Generator, keyword_rate: float) -> str:
    """The emoji left to right, joined by "and"."""
    return " and ".join(mention(concepts[o.concept], rng, keyword_rate) for o in scene.objects)


def neighbours(concepts: Sequence[Concept]) -> list[tuple[list[int], list[int]]]:
    """For each concept, the other concepts of its subgroup and those of its group: the pools a changed name is
    drawn from, in that order."""
    subgroups: dict[str, list[int]] = {}
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(concepts):
        subgroups.setdefault(c.subgroup, []).append(i)
        groups.setdefault(c.group, []).append(i)
    return [([j for j in subgroups[c.subgroup] if j != i], [j for j in groups[c.group] if j != i])
            for i, c in enumerate(concepts)]


def substitute(concept: int, present: set[int], near: Sequence[tuple[list[int], list[int]]], n_concepts: int,
               rng: np.random.Generator) -> int:
    """A concept absent from ``present``: of ``concept``'s subgroup when one is free, else of its group, else any."""
    for pool in (*near[concept], range(n_concepts)):
        free = [j for j in pool if j not in present]
        if free:
            return free[int(rng.integers(len(free)))]
    raise ConfigError("every concept is in the scene: the world needs more concepts than emoji per scene")


def statement(left: Scene, right: Scene, concepts: Sequence[Concept], near: Sequence[tuple[list[int], list[int]]],
              rng: np.random.Generator, config: WorldConfig) -> tuple[str, bool]:
    """An NLVR2 statement about two scenes and whether it is true (names, or counts with probability 1/3)."""
    label = bool(rng.random() < 0.5)
    side = int(rng.integers(2))  # the side a false statement changes
    if rng.random() < 1 / 3 and config.min_emoji < config.max_emoji:
        counts = [len(left.objects), len(right.objects)]
        if not label:
            others = [k for k in range(config.min_emoji, config.max_emoji + 1) if k != counts[side]]
            counts[side] = others[int(rng.integers(len(others)))]
        left_count, right_count = COUNT_WORDS[counts[0]], COUNT_WORDS[counts[1]]
        return f"the left image shows {left_count} emoji, the right image shows {right_count} emoji", label
    names = [[o.concept for o in s.objects] for s in (left, right)]
    if not label:
        slot = int(rng.integers(len(names[side])))
        names[side][slot] = substitute(names[side][slot], set(names[side]), near, len(concepts), rng)
    left_text, right_text = (" and ".join(concepts[c].name for c in side_names) for side_names in names)
    return f"the left image shows {left_text}, the right image shows {right_text}", label


def questions(scene: Scene, concepts: Sequence[Concept], near: Sequence[tuple[list[int], list[int]]],
              rng: np.random.Generator, config: WorldConfig) -> list[tuple[str, list[str], str, str]]:
    """``questions_per_image`` (question, ten answers, question_type, answer_type) of distinct kinds."""
    kinds = ["what", "count", "yesno"] + (["side"] if len(scene.objects) > 1 else [])
    chosen = [kinds[k] for k in rng.permutation(len(kinds))[:config.questions_per_image]]
    present = {o.concept for o in scene.objects}
    out = []
    for kind in chosen:
        if kind == "what":
            j = int(rng.integers(len(scene.objects)))
            concept = concepts[scene.objects[j].concept]
            answers = [mention(concept, rng, config.keyword_rate) for _ in range(10)]
            out.append((f"what is the {ORDINALS[j]} emoji from the left?", answers, "what is the", "other"))
        elif kind == "side":
            j = 0 if rng.random() < 0.5 else len(scene.objects) - 1
            name = concepts[scene.objects[j].concept].name
            out.append((f"which side is the {name} on?", ["left" if j == 0 else "right"] * 10, "which", "other"))
        elif kind == "count":
            out.append(("how many emoji are there?", [str(len(scene.objects))] * 10, "how many", "number"))
        else:
            yes = bool(rng.random() < 0.5)
            c = scene.objects[int(rng.integers(len(scene.objects)))].concept
            if not yes:
                c = substitute(c, present, near, len(concepts), rng)
            out.append((f"does the image show {concepts[c].name}?", ["yes" if yes else "no"] * 10, "does the",
                        "yes/no"))
    return [(q, [normalize_answer(a) for a in answers], qt, at) for q, answers, qt, at in out]


# -- writing ----------------------------------------------------------------------------------------------------
class _Stats:
    """Per-channel pixel sums (training images) and patch background counts (all images), kept as integers so that
    stats gathered over any split of the items into chunks add up to the same totals; floats only in
    :meth:`summary`."""

    def __init__(self, patch: int) -> None:
        self.patch = patch
        self.sum, self.sq, self.pixels = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64), 0
        self.patches, self.empty, self.below_5pct = 0, 0, 0

    def add_pixels(self, image: Any) -> None:
        px = np.asarray(image, dtype=np.int64).reshape(-1, 3)  # 8-bit levels
        self.sum += px.sum(0)
        self.sq += (px * px).sum(0)
        self.pixels += px.shape[0]

    def add_mask(self, alpha: np.ndarray) -> None:
        share = patch_foreground(alpha, self.patch)
        self.patches += share.size
        self.empty += int((share == 0).sum())
        self.below_5pct += int((share < 0.05).sum())

    def merge(self, other: _Stats) -> None:
        self.sum += other.sum
        self.sq += other.sq
        self.pixels += other.pixels
        self.patches += other.patches
        self.empty += other.empty
        self.below_5pct += other.below_5pct

    def summary(self) -> dict[str, Any]:
        n = max(1, self.pixels)
        mean = self.sum / (255.0 * n)  # of pixels scaled to [0, 1]
        std = np.sqrt(np.maximum(self.sq / (255.0 * 255.0 * n) - mean * mean, 0.0))
        return {"image_mean": [round(float(v), 4) for v in mean], "image_std": [round(float(v), 4) for v in std],
                "patch_background": {"patch": self.patch, "patches": self.patches,
                                     "no_foreground": self.empty / max(1, self.patches),
                                     "foreground_below_5pct": self.below_5pct / max(1, self.patches)}}


def _chunks(n: int, workers: int, most: int = 64) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(n)`` in order, about four per worker and at most ``most`` long."""
    size = max(1, min(most, -(-n // (4 * workers))))
    return [(a, min(n, a + size)) for a in range(0, n, size)]


def _offset(sizes: dict[str, int], split: str) -> int:
    """How many items the splits before ``split`` hold (ids run on across splits)."""
    splits = list(sizes)
    return sum(sizes[s] for s in splits[:splits.index(split)])


class _Writer:
    """Draws and saves images with their masks; every item has its own generator, so items can be drawn in any order
    and in any process (:func:`_draw_chunk`); their records and texts are gathered back in index order."""

    def __init__(self, out: Path, concepts: Sequence[Concept], bank: SpriteBank, config: WorldConfig,
                 workers: int = 1) -> None:
        self.out, self.concepts, self.bank, self.config, self.workers = out, concepts, bank, config, workers
        self.near = neighbours(concepts)
        self.stats = _Stats(config.patch)
        self.texts: list[str] = []

    def rng(self, *key: Any) -> np.random.Generator:
        return np.random.default_rng(mix_seed(self.config.seed, *key))

    def draw(self, rng: np.random.Generator, root: Path, relative: str, train: bool) -> Scene:
        """Sample and render a scene, save it at ``root/relative`` and its mask at ``root/masks/relative``."""
        from PIL import Image

        scene = sample_scene(rng, self.bank, len(self.concepts), self.config)
        image, alpha = render_scene(scene, self.bank, self.config)
        for path, picture in ((root / relative, image), (root / "masks" / relative, Image.fromarray(alpha, "L"))):
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path)
        self.stats.add_mask(alpha)
        if train:
            self.stats.add_pixels(image)
        return scene

    def annotations(self, scene: Scene) -> list[dict[str, Any]]:
        return [{"emoji": self.concepts[o.concept].char, "name": self.concepts[o.concept].name,
                 "box": list(o.box)} for o in scene.objects]

    def item(self, kind: str, split: str, i: int) -> tuple[Any, list[str]]:
        """Draw and save item ``i`` of a split of ``kind`` ("retrieval", "nlvr2", "vqav2"): its record (a list of
        questions for "vqav2") and its texts."""
        rng = self.rng(kind, split, i)
        if kind == "retrieval":
            filename = f"emoji_{split}_{i:06d}.png"
            scene = self.draw(rng, self.out / "karpathy", f"images/{filename}", train=split == "train")
            captions = tuple(caption(scene, self.concepts, rng, self.config.keyword_rate)
                             for _ in range(self.config.captions_per_image))
            image_id = _offset(self.config.retrieval, split) + i
            return CaptionedImage(filename, split, captions, image_id, "images",
                                  extra={"objects": self.annotations(scene)}), list(captions)
        if kind == "nlvr2":
            root = self.out / "nlvr2"
            identifier = f"{split}-{i // 4}-{i % 4}-0"
            directory = (i // 4) % 100 if split == "train" else None
            folder = f"images/{split}/" + (f"{directory}/" if directory is not None else "")
            left_name, right_name = (f"{split}-{i // 4}-{i % 4}-img{k}.png" for k in (0, 1))
            left = self.draw(rng, root, folder + left_name, train=False)
            right = self.draw(rng, root, folder + right_name, train=False)
            sentence, label = statement(left, right, self.concepts, self.near, rng, self.config)
            return NLVR2Example(identifier, sentence, label, directory, extra={
                "left_url": folder + left_name, "right_url": folder + right_name, "writer": "emoji-world",
                "left_objects": self.annotations(left), "right_objects": self.annotations(right)}), [sentence]
        image_id = _offset(self.config.vqav2, split) + i + 1
        scene = self.draw(rng, self.out / "vqav2", f"{split}/{image_file_name(split, image_id, 'EMOJI', 'png')}",
                          train=False)
        items, texts = [], []
        for k, (question, answers, qtype, atype) in enumerate(
                questions(scene, self.concepts, self.near, rng, self.config)):
            texts += [question, *answers]
            items.append(VQAQuestion(image_id * 1000 + k, image_id, question, tuple(answers),
                                     most_common_answer(answers), qtype, atype))
        return items, texts

    def items(self, kind: str, split: str, n: int, progress: bool, pool: Any = None) -> list[Any]:
        """The records of items ``0..n-1`` of a split in index order, drawn here or by ``pool`` in chunks; their texts
        and stats are added to the writer's."""
        desc = f"{kind} {split}"
        if pool is None:
            done = [self.item(kind, split, i) for i in tqdm(range(n), desc=desc, disable=not progress)]
        else:
            done = []
            with tqdm(total=n, desc=desc, disable=not progress) as bar:
                tasks = [(kind, split, start, stop) for start, stop in _chunks(n, self.workers)]
                for results, stats in pool.imap(_draw_chunk, tasks):  # imap keeps the order of the tasks
                    done += results
                    self.stats.merge(stats)
                    bar.update(len(results))
        for _, texts in done:
            self.texts += texts
        return [record for record, _ in done]

    def retrieval(self, progress: bool, pool: Any = None) -> None:
        images = [image for split, n in self.config.retrieval.items()
                  for image in self.items("retrieval", split, n, progress, pool)]
        write_karpathy(self.out / "karpathy" / "dataset_emoji.json", images, "emoji")

    def nlvr2(self, progress: bool, pool: Any = None) -> None:
        for split, n in self.config.nlvr2.items():
            examples = self.items("nlvr2", split, n, progress, pool)
            write_nlvr2(self.out / "nlvr2" / "data" / f"{split}.json", examples)

    def vqav2(self, progress: bool, pool: Any = None) -> None:
        for subtype, n in self.config.vqav2.items():
            items = [q for qs in self.items("vqav2", subtype, n, progress, pool) for q in qs]
            write_vqav2(self.out / "vqav2", subtype, items, data_type="emoji",
                        info={"description": "comp-vlm emoji world"})


_CHUNK_WRITER: _Writer | None = None  # a pool worker's writer (inherited on fork, unpickled once on spawn)


def _init_chunk_writer(writer: _Writer) -> None:
    global _CHUNK_WRITER
    _CHUNK_WRITER = writer


def _draw_chunk(task: tuple[str, str, int, int]) -> tuple[list[tuple[Any, list[str]]], _Stats]:
    """In a pool worker: draw and save items ``start..stop-1`` of a split; their records and texts, and their stats."""
    kind, split, start, stop = task
    writer = _CHUNK_WRITER
    assert writer is not None, "_draw_chunk runs in a pool made by _writer_pool"
    writer.stats = _Stats(writer.config.patch)
    return [writer.item(kind, split, i) for i in range(start, stop)], writer.stats


@contextmanager
def _writer_pool(writer: _Writer) -> Iterator[Any]:
    """``None`` for one worker (everything in this process), else a pool of ``writer.workers`` processes each holding
    the writer: forked where the platform can (the sprites are inherited, not pickled), spawned elsewhere."""
    if writer.workers == 1:
        yield None
        return
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(writer.workers, _init_chunk_writer, (writer,))
    try:
        yield pool
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()


def choose_concepts(concepts: Sequence[Concept], config: WorldConfig) -> list[Concept]:
    """All concepts, or a seeded subset of ``max_concepts`` of them (in source order)."""
    if config.max_concepts is None or config.max_concepts >= len(concepts):
        return list(concepts)
    keep = np.random.default_rng(mix_seed(config.seed, "concepts")).choice(len(concepts), config.max_concepts,
                                                                          replace=False)
    return [concepts[i] for i in sorted(keep.tolist())]


def write_world(out: PathLike, config: WorldConfig | None = None, concepts: Sequence[Concept] | None = None,
                glyphs: GlyphSource | None = None, sources: dict[str, PathLike] | None = None,
                overwrite: bool = False, progress: bool = True, workers: int = 1) -> dict[str, Any]:
    """Write the world's three datasets into ``out`` and return its ``world.json`` record.

    ``concepts`` (default: the installed sources, filtered by ``config.max_code_points`` and ``include_flags``) and
    ``glyphs`` (default: the installed font) name a missing Debian package in a :class:`DataError`;
    ``sources`` names the source files recorded with their sha256. ``world.json`` is written last: a folder that
    has it with the same settings is complete and is returned as it is; one with other settings needs
    ``overwrite``. ``workers`` processes draw the items (in chunks of each split): the same files, byte for byte,
    as one."""
    config = config or WorldConfig()
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    out = Path(out)
    marker = out / "world.json"
    if marker.is_file():
        existing = read_json(marker)
        if existing.get("config") == asdict(config) and not overwrite:
            return existing
        if not overwrite:
            raise DataError(f"{marker}: a world with other settings is already there (pass overwrite)")
    if sources is None and concepts is None:
        sources = {"emoji_test": EMOJI_TEST_PATH, "cldr": CLDR_PATH, "font": FONT_PATH}
    if concepts is None:
        concepts = load_concepts(max_code_points=config.max_code_points, include_flags=config.include_flags)
    concepts = choose_concepts(concepts, config)
    sprites = render_sprites(concepts, glyphs if glyphs is not None else FontGlyphs(), progress)
    keep = first_distinct(sprites)
    kept = set(keep)
    duplicates = [c.name for i, c in enumerate(concepts) if i not in kept]
    concepts = [concepts[i] for i in keep]
    if len(concepts) <= config.max_emoji:
        raise ConfigError(f"{len(concepts)} concepts cannot fill scenes of {config.max_emoji} distinct emoji")
    writer = _Writer(out, concepts, SpriteBank([sprites[i] for i in keep]), config, workers)
    with _writer_pool(writer) as pool:
        writer.retrieval(progress, pool)
        writer.nlvr2(progress, pool)
        writer.vqav2(progress, pool)
    (out / "LICENSES.txt").write_text(LICENCE_NOTE)
    record = {"format": WORLD_FORMAT, "config": asdict(config),
              "sources": {k: {"path": str(p), "sha256": file_digest(p)} for k, p in (sources or {}).items()},
              **writer.stats.summary(), "vocabulary": caption_vocabulary(writer.texts),
              "dropped_duplicate_pictures": duplicates,
              "concepts": [{"key": c.key, "emoji": c.char, "name": c.name, "keywords": list(c.keywords),
                            "group": c.group, "subgroup": c.subgroup} for c in concepts]}
    write_json(marker, record)
    return record


def read_world(root: PathLike) -> dict[str, Any]:
    """The ``world.json`` record of a written world."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise DataError(f"{path}: missing; write the world first (make emoji-world)")
    record = read_json(path)
    if not isinstance(record, dict) or record.get("format") != WORLD_FORMAT:
        raise DataError(f"{path}: not a {WORLD_FORMAT!r} record")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the emoji world (Karpathy, NLVR2 and VQAv2 datasets).")
    parser.add_argument("out", help="output folder, e.g. data/emoji-world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every split size (e.g. 0.01 to try)")
    parser.add_argument("--overwrite", action="store_true", help="replace a world written with other settings")
    parser.add_argument("--all-emoji", action="store_true",
                        help="every base emoji (about 1,870: flags and multi-code-point sequences too), not the 1,372 "
                             "with at most two code points and no flags")
    parser.add_argument("--emoji-test", default=str(EMOJI_TEST_PATH))
    parser.add_argument("--cldr", default=str(CLDR_PATH))
    parser.add_argument("--font", default=str(FONT_PATH))
    parser.add_argument("--sprites", default=None, help="a folder of <code points>.png sprites instead of the font")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing the images (the same world, byte for byte, as one)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    config = WorldConfig(seed=args.seed, **({"max_code_points": None, "include_flags": True} if args.all_emoji
                                            else {})).scaled(args.scale)
    sources = {"emoji_test": args.emoji_test, "cldr": args.cldr} | ({} if args.sprites else {"font": args.font})
    try:
        glyphs: GlyphSource = SpriteFolder(args.sprites) if args.sprites else FontGlyphs(args.font)
        concepts = load_concepts(args.emoji_test, args.cldr, config.max_code_points, config.include_flags)
        record = write_world(args.out, config, concepts, glyphs, sources, overwrite=args.overwrite,
                             workers=args.workers)
    except DataError as exc:
        parser.exit(2, f"error: {exc}\n")
    bg = record["patch_background"]
    print(f"wrote {args.out}: {len(record['concepts'])} concepts; {100 * bg['no_foreground']:.1f}% of "
          f"{bg['patch']}-px patches have no foreground")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "WORLD_FORMAT",
    "Placement",
    "Scene",
    "SpriteBank",
    "WorldConfig",
    "caption",
    "choose_concepts",
    "first_distinct",
    "mask_path",
    "mention",
    "neighbours",
    "patch_foreground",
    "questions",
    "read_mask",
    "read_world",
    "render_scene",
    "render_sprites",
    "sample_scene",
    "statement",
    "substitute",
    "write_world",
]
