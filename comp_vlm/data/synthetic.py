"""A tiny deterministic image-caption world of coloured shapes, for integration tests and offline demos.

An image is ``S x S`` with one to ``max_objects`` filled shapes on a noisy grey background; its caption names
them left to right, e.g. ``"a photo of a big red square left of a small blue circle"``. Generation is vectorised
over samples (Python loops run only over objects and shape kinds) and fully determined by the world's seed and
the per-call seed. A richer world can subclass :class:`SyntheticWorld` and override :meth:`sample_scenes`,
:meth:`render` and :meth:`describe` (and :meth:`vocabulary`); the loaders only use :meth:`SyntheticWorld.sample`.

:func:`make_retrieval_loaders` turns a world and a tokenizer into train/val/test batches in the format of
:mod:`comp_vlm.tasks.retrieval`: dicts with ``pixel_values`` ``(B, 3, S, S)`` float, ``input_ids`` and
``attention_mask`` ``(B, L)`` long (padded to the longest caption in the batch) and ``captions`` (list of str).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.15), "blue": (0.1, 0.2, 0.95), "yellow": (0.95, 0.9, 0.1),
}
#: object half-extent as a fraction of the image size
SIZES: dict[str, float] = {"small": 0.13, "big": 0.23}

ShapeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
#: shape name -> mask from offsets to the centre (dx, dy; y grows downwards) and the half-extent r
SHAPES: dict[str, ShapeFn] = {
    "square": lambda dx, dy, r: (dx.abs() <= r) & (dy.abs() <= r),
    "circle": lambda dx, dy, r: dx * dx + dy * dy <= r * r,
    "triangle": lambda dx, dy, r: (dy.abs() <= r) & (2 * dx.abs() <= dy + r),  # apex up, base 2r wide
    "cross": lambda dx, dy, r: ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r)),
}


def mix_seed(*parts: Any) -> int:
    """A 63-bit seed derived deterministically (across processes and platforms) from ``parts``."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass
class Scene:
    """Attributes of ``n`` scenes with up to ``K`` objects each; slot ``j`` is the j-th object from the left."""

    count: torch.Tensor  # (n,) long, objects per scene
    colour: torch.Tensor  # (n, K) long index into the world's colours
    shape: torch.Tensor  # (n, K) long index into the world's shapes
    size: torch.Tensor  # (n, K) long index into the world's sizes
    cx: torch.Tensor  # (n, K) float centre x in pixels
    cy: torch.Tensor  # (n, K) float centre y in pixels
    background: torch.Tensor  # (n,) float grey level

    @property
    def valid(self) -> torch.Tensor:
        """(n, K) bool: the slot holds an object."""
        return torch.arange(self.colour.shape[1]) < self.count[:, None]


class SyntheticWorld:
    """Coloured shapes on a noisy background, captioned left to right.

    Objects of a scene occupy equal-width vertical strips (one per object), so they never overlap when
    ``SIZES`` allow it (``max_objects <= 2`` with the defaults) and the caption order is the left-to-right order.
    """

    def __init__(
        self, image_size: int = 16, max_objects: int = 2, seed: int = 0,
        colours: Sequence[str] = tuple(COLOURS), shapes: Sequence[str] = ("square", "circle", "triangle"),
        sizes: Sequence[str] = tuple(SIZES), noise: float = 0.05,
    ) -> None:
        unknown = (set(colours) - set(COLOURS)) | (set(shapes) - set(SHAPES)) | (set(sizes) - set(SIZES))
        if unknown:
            raise ValueError(f"unknown attribute values: {sorted(unknown)}")
        if image_size < 4 or max_objects < 1:
            raise ValueError("need image_size >= 4 and max_objects >= 1")
        self.image_size, self.max_objects, self.seed, self.noise = image_size, max_objects, seed, noise
        self.colours, self.shapes, self.sizes = tuple(colours), tuple(shapes), tuple(sizes)
        self._rgb = torch.tensor([COLOURS[c] for c in self.colours])
        self._radius = torch.tensor([SIZES[s] for s in self.sizes]) * image_size
        self._stats: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # -- generation -------------------------------------------------------------------------------------------
    def sample_scenes(self, n: int, g: torch.Generator) -> Scene:
        """Random scene attributes; objects are placed in per-object strips, left to right."""
        k, s = self.max_objects, self.image_size
        count = torch.randint(1, k + 1, (n,), generator=g)
        colour = torch.randint(len(self.colours), (n, k), generator=g)
        shape = torch.randint(len(self.shapes), (n, k), generator=g)
        size = torch.randint(len(self.sizes), (n, k), generator=g)
        ux, uy = torch.rand(n, k, generator=g), torch.rand(n, k, generator=g)
        background = 0.35 + 0.3 * torch.rand(n, generator=g)
        r = self._radius[size]
        strip = s / count[:, None].float()
        cx = torch.arange(k) * strip + r + ux * (strip - 2 * r).clamp(min=0)
        cy = r + uy * (s - 2 * r)
        return Scene(count, colour, shape, size, cx, cy, background)

    def render(self, scene: Scene, g: torch.Generator) -> torch.Tensor:
        """Images ``(n, 3, S, S)`` in ``[0, 1]``."""
        s = self.image_size
        n = scene.count.shape[0]
        grid = torch.arange(s, dtype=torch.float32) + 0.5  # pixel centres
        dx = grid.view(1, 1, 1, s) - scene.cx[..., None, None]  # (n, K, S, S)
        dy = grid.view(1, 1, s, 1) - scene.cy[..., None, None]
        r = self._radius[scene.size][..., None, None]
        masks = torch.zeros(n, scene.cx.shape[1], s, s, dtype=torch.bool)
        for i, name in enumerate(self.shapes):
            masks |= (scene.shape == i)[..., None, None] & SHAPES[name](dx, dy, r)
        masks &= scene.valid[..., None, None]
        img = scene.background.view(n, 1, 1, 1).expand(n, 3, s, s).clone()
        for j in range(scene.colour.shape[1]):
            img = torch.where(masks[:, j, None], self._rgb[scene.colour[:, j]][..., None, None], img)
        img += self.noise * torch.randn(img.shape, generator=g)
        return img.clamp_(0, 1)

    def describe(self, scene: Scene) -> list[str]:
        """Captions naming the objects left to right."""
        counts = scene.count.tolist()
        attrs = zip(scene.size.tolist(), scene.colour.tolist(), scene.shape.tolist())
        return [
            "a photo of " + " left of ".join(
                f"a {self.sizes[sz[j]]} {self.colours[co[j]]} {self.shapes[sh[j]]}" for j in range(c))
            for c, (sz, co, sh) in zip(counts, attrs)
        ]

    def content_keys(self, scene: Scene) -> list[str]:
        """What a caption says about its image, without wording that is independent of the image: two pairs
        with equal keys are interchangeable for retrieval. Here the caption itself."""
        return self.describe(scene)

    def sample_raw_keyed(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
        """``n`` images in ``[0, 1]``, their captions and content keys, determined by the world's seed and
        ``seed``."""
        return self._sample_raw(n, mix_seed(self.seed, seed))

    def sample_raw(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """``n`` images in ``[0, 1]`` and their captions, determined by the world's seed and ``seed``."""
        pixels, captions, _ = self.sample_raw_keyed(n, seed)
        return pixels, captions

    def _scenes_and_pixels(self, n: int, g: torch.Generator) -> tuple[Scene, torch.Tensor]:
        scenes = self.sample_scenes(n, g)
        chunk = 2048  # bounds the (n, K, S, S) mask memory
        images = [self.render(_slice(scenes, i, i + chunk), g) for i in range(0, n, chunk)]
        pixels = torch.cat(images) if images else torch.zeros(0, 3, self.image_size, self.image_size)
        return scenes, pixels

    def _sample_raw(self, n: int, generator_seed: int) -> tuple[torch.Tensor, list[str], list[str]]:
        scenes, pixels = self._scenes_and_pixels(n, torch.Generator().manual_seed(generator_seed))
        return pixels, self.describe(scenes), self.content_keys(scenes)

    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, list[str]]:
        """Normalised ``pixel_values`` ``(n, 3, S, S)`` (per-channel :attr:`image_mean`/:attr:`image_std`) and
        captions."""
        pixels, captions = self.sample_raw(n, seed)
        return self.normalise(pixels), captions

    def sample_keyed(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, list[str], list[str]]:
        """Like :meth:`sample`, plus the content keys."""
        pixels, captions, keys = self.sample_raw_keyed(n, seed)
        return self.normalise(pixels), captions, keys

    # -- normalisation and vocabulary -------------------------------------------------------------------------
    def _compute_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        if self._stats is None:
            pixels = self._sample_raw(512, mix_seed(self.seed, "stats"))[0]
            mean = pixels.mean(dim=(0, 2, 3))
            std = pixels.std(dim=(0, 2, 3))
            self._stats = (tuple(round(v, 4) for v in mean.tolist()), tuple(round(v, 4) for v in std.tolist()))
        return self._stats

    @property
    def image_mean(self) -> tuple[float, ...]:
        """Per-channel mean of raw images (for a ``CLIPImageProcessor``'s ``image_mean``)."""
        return self._compute_stats()[0]

    @property
    def image_std(self) -> tuple[float, ...]:
        """Per-channel std of raw images (for a ``CLIPImageProcessor``'s ``image_std``)."""
        return self._compute_stats()[1]

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std).view(1, 3, 1, 1)
        return (pixels - mean) / std

    def vocabulary(self) -> list[str]:
        """Every word a caption can contain, sorted."""
        words = {"a", "photo", "of"} | set(self.colours) | set(self.shapes) | set(self.sizes)
        if self.max_objects > 1:
            words |= {"left"}
        return sorted(words)


def _slice(scene: Scene, start: int, stop: int) -> Scene:
    return Scene(*(getattr(scene, f)[start:stop] for f in scene.__dataclass_fields__))


# -- loaders ------------------------------------------------------------------------------------------------------
class PairData:
    """Image-caption pairs with captions tokenized once (padded to the longest caption overall). ``keys``
    (optional, one per pair) are content keys: batches then carry them as ``match_keys`` (see
    :mod:`comp_vlm.tasks.retrieval`)."""

    def __init__(self, pixel_values: torch.Tensor, captions: list[str], tokenizer: Any,
                 keys: Sequence[str] | None = None) -> None:
        if len(captions) != pixel_values.shape[0] or (keys is not None and len(keys) != len(captions)):
            raise ValueError("one caption (and one key, when given) per image is required")
        self.pixel_values, self.captions = pixel_values, list(captions)
        self.keys = None if keys is None else list(keys)
        tok = tokenizer(self.captions, padding=True, return_tensors="pt")
        self.input_ids = tok["input_ids"].long()
        self.attention_mask = tok["attention_mask"].long()

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index: torch.Tensor) -> dict[str, Any]:
        """The batch of pairs ``index``; text columns that are padding in every row are dropped."""
        mask = self.attention_mask[index]
        cols = mask.any(0)
        rows = index.tolist()
        out = {"pixel_values": self.pixel_values[index], "input_ids": self.input_ids[index][:, cols],
               "attention_mask": mask[:, cols], "captions": [self.captions[i] for i in rows]}
        if self.keys is not None:
            out["match_keys"] = [self.keys[i] for i in rows]
        return out


def fixed_batches(data: PairData, batch_size: int) -> list[dict[str, Any]]:
    """Batches in data order, the last one possibly smaller: for validation and test."""
    return [data.batch(torch.arange(i, min(i + batch_size, len(data)))) for i in range(0, len(data), batch_size)]


class ShuffledBatches:
    """Re-iterable training batches, reshuffled every epoch by a generator seeded from ``(seed, epoch)``.

    Iterating yields the rest of the current epoch from :attr:`position`, then advances :attr:`epoch`; breaking
    out of a loop and iterating again resumes at the next batch. ``state_dict()``/``load_state_dict()`` hold
    ``(epoch, position)``, enough to resume exactly. Incomplete last batches are dropped (contrastive losses
    depend on batch size). One iterator at a time: concurrent iterators share the position.
    """

    def __init__(self, data: PairData, batch_size: int, seed: int = 0) -> None:
        if not 0 < batch_size <= len(data):
            raise ValueError(f"batch_size must be in [1, {len(data)}], got {batch_size}")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.data) // self.batch_size

    def order(self, epoch: int) -> torch.Tensor:
        """The permutation of pairs used in ``epoch``."""
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch)))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.order(self.epoch)
        while self.position < len(self):
            start = self.position * self.batch_size
            self.position += 1  # before yielding: a checkpoint taken while the batch is used points past it
            yield self.data.batch(order[start:start + self.batch_size])
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class RetrievalLoaders(NamedTuple):
    train: ShuffledBatches
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]


def make_retrieval_loaders(
    world: SyntheticWorld, tokenizer: Any, n_train: int, n_val: int, n_test: int, batch_size: int,
    seed: int = 0, eval_batch_size: int | None = None,
) -> RetrievalLoaders:
    """Train (shuffled, re-iterable), val and test (fixed lists of batches) splits, each sampled from the world
    with its own seed derived from ``seed`` (so the splits are different samples)."""
    def split(name: str, n: int) -> PairData:
        pixels, captions, keys = world.sample_keyed(n, seed=mix_seed(seed, name))
        return PairData(pixels, captions, tokenizer, keys)

    eval_bs = eval_batch_size or batch_size
    return RetrievalLoaders(
        train=ShuffledBatches(split("train", n_train), batch_size, seed=mix_seed(seed, "shuffle")),
        val=fixed_batches(split("val", n_val), eval_bs),
        test=fixed_batches(split("test", n_test), eval_bs),
    )


#: uninformative filler words, drawn independently of the scene (the language-token mode has real redundancy)
FILLERS = ("in", "this", "picture", "we", "can", "see", "there", "is", "here", "clearly", "shown", "on",
           "textured", "background", "image", "nice")
BENCHMARK_SIZES: dict[str, float] = {"small": 0.08, "big": 0.13}


class BenchmarkWorld(SyntheticWorld):
    """The benchmark world (issue: offline benchmark): 2-4 small objects on a textured, uninformative
    background; patch 4 on 32 px gives 64 patches, most of them background (input-dependent token redundancy);
    colour + shape + size of every object, named left to right, so no mode can drop everything; captions of
    12-20 tokens (with BOS/EOS) padded by uninformative filler words drawn independently of the scene.
    """

    def __init__(self, image_size: int = 32, min_objects: int = 2, max_objects: int = 4, seed: int = 0,
                 shapes: Sequence[str] = ("square", "circle", "triangle", "cross"), texture: float = 0.12,
                 min_tokens: int = 12, max_tokens: int = 20, **kw: Any) -> None:
        super().__init__(image_size=image_size, max_objects=max_objects, seed=seed, shapes=shapes, **kw)
        if not 1 <= min_objects <= max_objects:
            raise ValueError("need 1 <= min_objects <= max_objects")
        self.min_objects, self.texture = min_objects, texture
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self._radius = torch.tensor([BENCHMARK_SIZES[s] for s in self.sizes]) * image_size

    def sample_scenes(self, n: int, g: torch.Generator) -> Scene:
        scene = super().sample_scenes(n, g)
        count = torch.randint(self.min_objects, self.max_objects + 1, (n,), generator=g)
        k, s = self.max_objects, self.image_size
        r = self._radius[scene.size]
        strip = s / count[:, None].float()
        ux = torch.rand(n, k, generator=g)
        scene.count = count
        scene.cx = torch.arange(k) * strip + r + ux * (strip - 2 * r).clamp(min=0)
        scene.filler = torch.randint(len(FILLERS), (n, self.max_tokens), generator=g)  # type: ignore[attr-defined]
        scene.filler_len = torch.rand(n, generator=g)  # type: ignore[attr-defined]
        return scene

    def render(self, scene: Scene, g: torch.Generator) -> torch.Tensor:
        img = super().render(scene, g)
        n, s = img.shape[0], self.image_size
        # a random low-frequency grey texture, independent of the caption
        grid = torch.linspace(0, 2 * torch.pi, s)
        fx, fy = (1 + 3 * torch.rand(n, 1, 1, generator=g)), (1 + 3 * torch.rand(n, 1, 1, generator=g))
        phase = 2 * torch.pi * torch.rand(n, 1, 1, generator=g)
        tex = torch.sin(fx * grid.view(1, 1, s) + phase) * torch.cos(fy * grid.view(1, s, 1) + phase)
        background = (img - img.mean(dim=1, keepdim=True)).abs().sum(dim=1, keepdim=True) < 0.25  # grey pixels
        return (img + self.texture * tex[:, None] * background).clamp_(0, 1)

    def describe(self, scene: Scene) -> list[str]:
        out = []
        for i, objects in enumerate(self.objects(scene)):
            words = 2 + 3 + len(objects.split())  # BOS/EOS + "a photo showing"
            room = max(0, self.max_tokens - words)
            need = max(0, self.min_tokens - words)
            extra = need + int(scene.filler_len[i] * (room - need + 1)) if room >= need else 0  # type: ignore[attr-defined]
            filler = " ".join(FILLERS[t] for t in scene.filler[i, :extra].tolist())  # type: ignore[attr-defined]
            out.append(" ".join(p for p in ("a photo showing", objects, filler) if p))
        return out

    def objects(self, scene: Scene) -> list[str]:
        """The object descriptions, left to right, e.g. ``"big red cross then small blue circle"``."""
        return [" then ".join(f"{self.sizes[sz[j]]} {self.colours[co[j]]} {self.shapes[sh[j]]}" for j in range(c))
                for c, sz, co, sh in zip(scene.count.tolist(), scene.size.tolist(), scene.colour.tolist(),
                                         scene.shape.tolist())]

    def content_keys(self, scene: Scene) -> list[str]:
        """The objects only: fillers are independent of the image."""
        return self.objects(scene)

    def vocabulary(self) -> list[str]:
        return sorted({"a", "photo", "showing", "then"} | set(self.colours) | set(self.shapes) | set(self.sizes)
                      | set(FILLERS))


ORDINALS = ("first", "second", "third", "fourth")
NUMBERS = ("zero", "one", "two", "three", "four")


def sample_statements(world: BenchmarkWorld, n: int, seed: int | None = None,
                      ) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """True/false statements about images (for image-text matching heads such as BLIP's ITM / NLVR-style tasks):
    normalised ``pixel_values`` ``(n, 3, S, S)``, statements like ``"the second object from the left is a small
    red circle"`` and ``(n,)`` bool labels, half true. A false statement changes exactly one attribute (colour,
    shape or size) of the named object, so it cannot be rejected without looking at that object."""
    g = torch.Generator().manual_seed(mix_seed(world.seed, "statements", seed))
    scenes, pixels = world._scenes_and_pixels(n, g)
    slot = (torch.rand(n, generator=g) * scenes.count).long()
    label = torch.rand(n, generator=g) < 0.5
    which = torch.randint(3, (n,), generator=g)  # the attribute a false statement changes
    rows = torch.arange(n)
    attrs = [scenes.size[rows, slot].clone(), scenes.colour[rows, slot].clone(), scenes.shape[rows, slot].clone()]
    names = (world.sizes, world.colours, world.shapes)
    for k, values in enumerate(names):
        change = ~label & (which == k)
        shift = 1 + (torch.rand(n, generator=g) * (len(values) - 1)).long()  # a different value, uniformly
        attrs[k] = torch.where(change, (attrs[k] + shift) % len(values), attrs[k])
    statements = [f"the {ORDINALS[j]} object from the left is a {world.sizes[a]} {world.colours[b]} "
                  f"{world.shapes[c]}" for j, a, b, c in zip(slot.tolist(), *(t.tolist() for t in attrs))]
    return world.normalise(pixels), statements, label


def sample_questions(world: BenchmarkWorld, n: int, seed: int | None = None,
                     ) -> tuple[torch.Tensor, list[str], list[str]]:
    """Question/answer pairs about images (for generative VLMs such as LLaVA): normalised ``pixel_values``,
    questions (the colour, shape or size of the j-th object from the left, or how many objects there are) and
    one-word answers."""
    g = torch.Generator().manual_seed(mix_seed(world.seed, "questions", seed))
    scenes, pixels = world._scenes_and_pixels(n, g)
    slot = (torch.rand(n, generator=g) * scenes.count).long().tolist()
    kind = torch.randint(4, (n,), generator=g).tolist()
    attributes = (("size", world.sizes, scenes.size), ("colour", world.colours, scenes.colour),
                  ("shape", world.shapes, scenes.shape))
    questions, answers = [], []
    for i, (j, k) in enumerate(zip(slot, kind)):
        if k == 3:
            questions.append("how many objects are there")
            answers.append(NUMBERS[int(scenes.count[i])])
            continue
        attr, values, field = attributes[k]
        questions.append(f"what {attr} is the {ORDINALS[j]} object from the left")
        answers.append(values[int(field[i, j])])
    return world.normalise(pixels), questions, answers


def task_vocabulary(world: BenchmarkWorld) -> list[str]:
    """Every word of the world's captions, statements, questions and answers."""
    extra = {"the", "object", "from", "left", "is", "what", "how", "many", "objects", "are", "there", "size",
             "colour", "shape"} | set(ORDINALS) | set(NUMBERS)
    return sorted(set(world.vocabulary()) | extra)
