"""Image-text retrieval for CLIP-style dual encoders: symmetric InfoNCE loss and Recall@K.

Batch format (a dict):

- ``pixel_values``: float ``(B, 3, H, W)``; ``input_ids``, ``attention_mask``: long ``(B, L)`` -- pair ``i`` is
  image ``i`` with text ``i``;
- ``captions`` (optional): ``list[str]`` of the ``B`` caption strings;
- ``image_ids`` (optional): ``B`` hashable image identities, for datasets that repeat an image with several
  captions (COCO/Flickr pairs);
- ``match_keys`` (optional): ``B`` hashable *content* keys, overriding both of the above: pairs with equal keys
  are interchangeable (synthetic worlds whose captions add wording independent of the image, e.g. fillers).

Matching rule. Items are identified by *keys*: a text by its caption string (by its position in the loader when
``captions`` is absent), an image by its ``image_ids`` entry (else its position). The galleries are
de-duplicated by key (the first occurrence's embedding stands for the key; identical captions have identical
embeddings anyway), and an image and a text are *relevant* to each other when some pair in the data joins their
keys. So when one caption string describes several images, image-to-text retrieval is correct when the retrieved
caption string equals the query image's caption, and each unique caption is one text query whose correct
answers are all images carrying it. Recall@K is the percentage of queries with a relevant item among the top K;
ties are counted against the query (a relevant item ranks below every irrelevant item scoring the same or more).
With ``gallery_size`` set, the pairs are cut (in loader order) into consecutive galleries of exactly that many
pairs (a shorter remainder is left out) and the metrics are averaged over galleries, so the numbers do not depend
on how large the test split is.

The training loss uses the same relevance inside a batch: the targets of a row are spread evenly over every
column relevant to it (same caption or same image), so duplicates are not pushed apart as false negatives. It is
the family's contrastive loss of the two embeddings (:func:`register_contrastive_loss`: SigLIP's is sigmoid with
``logit_bias``), else symmetric InfoNCE at ``exp(logit_scale)`` (CLIP); the task computes it from the embeddings,
never through the model's ``return_loss``, so embeddings gathered from several processes can feed it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Task, eval_mode, model_device

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
DEFAULT_GALLERY = 100  # the galleries' size when none is asked for (the whole split when it is smaller)


def _embedding(out: Any) -> torch.Tensor:
    """A feature tensor from ``get_*_features``: a tensor (transformers 4.x) or an output whose ``pooler_output``
    holds the projected embedding (transformers 5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, torch.Tensor):
        return pooled
    raise TypeError(f"cannot read an embedding from {type(out).__name__}: expected a tensor or .pooler_output")


def _keys(values: Any) -> list[Hashable]:
    """A batch entry of keys as a list of hashables (tensors become Python numbers, which hash by value)."""
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _key_ids(keys: Sequence[Hashable]) -> torch.Tensor:
    """Dense ids ``0..U-1`` (in order of first occurrence) for a sequence of hashable keys."""
    table: dict[Hashable, int] = {}
    return torch.tensor([table.setdefault(k, len(table)) for k in keys], dtype=torch.long)


def batch_positives(batch: Batch, n: int, device: torch.device | None = None) -> torch.Tensor | None:
    """``(n, n)`` bool matrix of relevant (image i, text j) pairs in a batch, or ``None`` when the batch carries no
    keys (then only the diagonal is relevant)."""
    pos = None
    for name in (("match_keys",) if batch.get("match_keys") is not None else ("captions", "image_ids")):
        keys = batch.get(name)
        if keys is not None:
            ids = _key_ids(_keys(keys)).to(device)
            same = ids[:, None] == ids[None, :]
            pos = same if pos is None else pos | same
    return pos


def similarity_logits(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``(B, B)`` cosine similarities of image ``i`` and text ``j`` (float32) times ``scale``."""
    return scale * F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor | float,
    positives: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over cosine similarities times ``scale``: the mean of the image-to-text and
    text-to-image cross-entropies. ``positives`` (``(B, B)`` bool, diagonal set) spreads each row's target evenly
    over its relevant columns; ``None`` means the diagonal only (standard CLIP loss)."""
    logits = similarity_logits(image_emb, text_emb, scale)
    if positives is None:
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    target = positives.float()
    return (F.cross_entropy(logits, target / target.sum(1, keepdim=True))
            + F.cross_entropy(logits.t(), target.t() / target.t().sum(1, keepdim=True))) / 2


ContrastiveLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``loss(model, image_emb, text_emb, positives) -> scalar``: a family's contrastive loss of a batch's projected,
unnormalised embeddings (B, D), reading the model's temperature (and bias); ``positives`` as for
:func:`contrastive_loss`."""

CONTRASTIVE_LOSSES: dict[type, ContrastiveLoss] = {}
"""The families' contrastive losses by model class (:func:`register_contrastive_loss`)."""


def register_contrastive_loss(model_class: type, loss: ContrastiveLoss) -> None:
    """Make ``loss`` the retrieval loss of ``model_class`` and its subclasses (a family file calls it)."""
    CONTRASTIVE_LOSSES[model_class] = loss


def family_contrastive_loss(model: nn.Module) -> ContrastiveLoss | None:
    """The contrastive loss registered for ``model``'s class or its nearest registered base (None: InfoNCE)."""
    return next((CONTRASTIVE_LOSSES[c] for c in type(model).__mro__ if c in CONTRASTIVE_LOSSES), None)


def _ranks(queries: torch.Tensor, gallery: torch.Tensor, q_of_pair: torch.Tensor, g_of_pair: torch.Tensor,
           chunk: int = 1024) -> torch.Tensor:
    """For each query, how many irrelevant gallery items score at least as high as its best relevant item."""
    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start:start + chunk] @ gallery.t()
        rel = torch.zeros_like(sim, dtype=torch.bool)
        sel = (q_of_pair >= start) & (q_of_pair < start + sim.shape[0])
        rel[q_of_pair[sel] - start, g_of_pair[sel]] = True
        best = sim.masked_fill(~rel, -math.inf).amax(1, keepdim=True)
        ranks[start:start + sim.shape[0]] = ((sim >= best) & ~rel).sum(1).cpu()
    return ranks


def retrieval_metrics(
    image_emb: torch.Tensor, text_emb: torch.Tensor, image_keys: Sequence[Hashable] | None = None,
    text_keys: Sequence[Hashable] | None = None, ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@K in percent for ``N`` (image, text) pairs given as per-pair embeddings ``(N, D)``.

    Keys identify items (default: the pair index, i.e. every item unique); see the module docstring for the
    matching rule. Returns ``i2t_r{k}``, ``t2i_r{k}`` for each ``k`` and ``r1_mean`` (mean of the two R@1)
    when 1 is among ``ks``."""
    n = image_emb.shape[0]
    if text_emb.shape[0] != n or n == 0:
        raise ValueError(f"need the same positive number of images and texts, got {n} and {text_emb.shape[0]}")
    img_id = _key_ids(_keys(image_keys) if image_keys is not None else range(n))
    txt_id = _key_ids(_keys(text_keys) if text_keys is not None else range(n))
    if len(img_id) != n or len(txt_id) != n:
        raise ValueError("image_keys and text_keys must have one entry per pair")
    first = torch.arange(n)
    img_first = torch.full((int(img_id.max()) + 1,), n).scatter_reduce(0, img_id, first, "amin")
    txt_first = torch.full((int(txt_id.max()) + 1,), n).scatter_reduce(0, txt_id, first, "amin")
    images = F.normalize(image_emb.float(), dim=-1)[img_first.to(image_emb.device)]
    texts = F.normalize(text_emb.float(), dim=-1)[txt_first.to(text_emb.device)].to(images.device)
    dev = images.device
    i2t = _ranks(images, texts, img_id.to(dev), txt_id.to(dev))
    t2i = _ranks(texts, images, txt_id.to(dev), img_id.to(dev))
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
    if 1 in ks:
        out["r1_mean"] = (out["i2t_r1"] + out["t2i_r1"]) / 2
    return out


def retrieval_task(gallery_size: int | None = 0, eval_pairs: int | None = None) -> RetrievalTask:
    """The retrieval task of the command line's options (registered as ``retrieval``): ``gallery_size`` 0 means
    one gallery of every evaluation pair, None the default (:data:`DEFAULT_GALLERY`, or the whole split when it is
    smaller). ``eval_pairs``: the smallest split the task will evaluate (validation or test), which must fill one
    gallery."""
    from ..errors import ConfigError

    if gallery_size is None:
        gallery_size = DEFAULT_GALLERY if eval_pairs is None or eval_pairs >= DEFAULT_GALLERY else 0
    if gallery_size < 0 or gallery_size == 1:
        raise ConfigError(f"--gallery-size must be 0 (whole split) or at least 2, got {gallery_size}")
    if gallery_size and eval_pairs is not None and gallery_size > eval_pairs:
        raise ConfigError(f"--gallery-size {gallery_size} exceeds the {eval_pairs} evaluation pairs of a split")
    return RetrievalTask(gallery_size=gallery_size or None)


class RetrievalTask(Task):
    """Contrastive image-text retrieval for models with ``get_image_features(pixel_values=...)``,
    ``get_text_features(input_ids=..., attention_mask=...)`` and a ``logit_scale`` parameter (log of the
    inverse temperature), such as the dual encoders of the retrieval families.

    ``max_scale`` caps ``exp(logit_scale)`` in the loss (100, as in CLIP training); ``default_logit_scale`` is
    used for models without ``logit_scale``.
    """

    primary_metric = "r1_mean"
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = DEFAULT_KS, max_scale: float = 100.0,
                 default_logit_scale: float = math.log(1 / 0.07), gallery_size: int | None = None) -> None:
        if 1 not in ks:
            raise ValueError("ks must contain 1 (the primary metric is R@1)")
        if gallery_size is not None and gallery_size < 2:
            raise ValueError(f"gallery_size must be at least 2, got {gallery_size}")
        self.ks = tuple(ks)
        self.gallery_size = gallery_size
        self.max_scale = max_scale
        self.default_logit_scale = default_logit_scale

    def supports(self, model: nn.Module) -> bool:
        """Dual encoders: a model with ``get_image_features`` and ``get_text_features``."""
        return all(callable(getattr(model, name, None)) for name in ("get_image_features", "get_text_features"))

    # -- encoders ---------------------------------------------------------------------------------------------
    @staticmethod
    def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings ``(B, D)``."""
        return _embedding(model.get_image_features(pixel_values=pixel_values))

    @staticmethod
    def encode_texts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Projected (unnormalised) text embeddings ``(B, D)``."""
        return _embedding(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))

    def scale(self, model: nn.Module) -> torch.Tensor:
        """``exp(logit_scale)`` capped at ``max_scale`` (differentiable below the cap)."""
        log_scale = getattr(model, "logit_scale", None)
        if log_scale is None:
            log_scale = torch.tensor(self.default_logit_scale, device=model_device(model))
        return log_scale.float().exp().clamp(max=self.max_scale)

    # -- Task -------------------------------------------------------------------------------------------------
    def _embeddings(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and text embeddings of ``batch`` (projected, unnormalised)."""
        return (self.encode_images(model, batch["pixel_values"]),
                self.encode_texts(model, batch["input_ids"], batch.get("attention_mask")))

    def pair_loss(self, model: nn.Module, img: torch.Tensor, txt: torch.Tensor,
                  positives: torch.Tensor | None = None) -> torch.Tensor:
        """The contrastive loss of image and text embeddings ``(B, D)``: the family's
        (:func:`register_contrastive_loss`), else symmetric InfoNCE at :meth:`scale`."""
        family = family_contrastive_loss(model)
        if family is not None:
            return family(model, img, txt, positives)
        return contrastive_loss(img, txt, self.scale(model), positives)

    def _contrastive(self, model: nn.Module, batch: Batch, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return self.pair_loss(model, img, txt, batch_positives(batch, img.shape[0], img.device))

    def _kd(self, student: nn.Module, teacher: nn.Module, batch: Batch, img: torch.Tensor,
            txt: torch.Tensor) -> torch.Tensor:
        logits = similarity_logits(img, txt, self.scale(student))
        with torch.no_grad():
            t_logits = similarity_logits(*self._embeddings(teacher, batch), self.scale(teacher))
        kl_i = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(t_logits, 1), log_target=True, reduction="batchmean")
        kl_t = F.kl_div(F.log_softmax(logits.t(), 1), F.log_softmax(t_logits.t(), 1), log_target=True,
                        reduction="batchmean")
        return (kl_i + kl_t) / 2

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return self._contrastive(model, batch, *self._embeddings(model, batch))

    def distill_loss(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> torch.Tensor:
        """KL from the teacher's to the student's image->text and text->image similarity distributions over the
        batch (logit KD; the teacher runs under no_grad with its own temperature)."""
        return self._kd(student, teacher, batch, *self._embeddings(student, batch))

    def loss_with_distill(self, student: nn.Module, teacher: nn.Module, batch: Batch, weight: float) -> torch.Tensor:
        """Contrastive loss + ``weight`` × KD from one student forward."""
        img, txt = self._embeddings(student, batch)
        return self._contrastive(student, batch, img, txt) + weight * self._kd(student, teacher, batch, img, txt)

    def embed(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, Any]:
        """Embeddings of every pair in ``loader`` (eval mode, no grad, previous mode restored): ``image_emb``,
        ``text_emb`` ``(N, D)``, ``image_keys``, ``text_keys`` (lists) and ``loss`` (mean over batches)."""
        device = model_device(model)
        imgs: list[torch.Tensor] = []
        txts: list[torch.Tensor] = []
        image_keys: list[Hashable] = []
        text_keys: list[Hashable] = []
        losses: list[float] = []
        with eval_mode(model), torch.no_grad():
            for batch in loader:
                batch = self.batch_to(batch, device)
                img = self.encode_images(model, batch["pixel_values"])
                txt = self.encode_texts(model, batch["input_ids"], batch.get("attention_mask"))
                losses.append(float(self.pair_loss(model, img, txt, batch_positives(batch, len(img), device))))
                offset = len(image_keys)
                # keys of different kinds never collide: positions are ints, real keys come from the data
                if "match_keys" in batch:
                    image_keys += _keys(batch["match_keys"])
                    text_keys += _keys(batch["match_keys"])
                else:
                    image_keys += _keys(batch["image_ids"]) if "image_ids" in batch else \
                        [("#", offset + i) for i in range(len(img))]
                    text_keys += _keys(batch["captions"]) if "captions" in batch else \
                        [("#", offset + i) for i in range(len(txt))]
                imgs.append(img.float())
                txts.append(txt.float())
        if not imgs:
            raise ValueError("evaluation loader is empty")
        return {"image_emb": torch.cat(imgs), "text_emb": torch.cat(txts), "image_keys": image_keys,
                "text_keys": text_keys, "loss": sum(losses) / len(losses)}

    def evaluate(self, model: nn.Module, loader: Iterable[Batch]) -> dict[str, float]:
        """``i2t_r{k}``, ``t2i_r{k}`` (percent), ``r1_mean`` and ``loss`` over the whole loader as one gallery, or
        averaged over galleries of ``gallery_size`` pairs."""
        e = self.embed(model, loader)
        metrics = gallery_metrics(e["image_emb"], e["text_emb"], e["image_keys"], e["text_keys"], self.ks,
                                  self.gallery_size)
        metrics["loss"] = e["loss"]
        return metrics

    def evaluate_galleries(self, model: nn.Module, loader: Iterable[Batch]) -> list[dict[str, float]]:
        """The metrics of every gallery apart (one entry when ``gallery_size`` is None): for paired comparisons
        and bootstrap spreads over galleries."""
        e = self.embed(model, loader)
        return per_gallery_metrics(e["image_emb"], e["text_emb"], e["image_keys"], e["text_keys"], self.ks,
                                   self.gallery_size)


def gallery_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, image_keys: Sequence[Hashable],
                    text_keys: Sequence[Hashable], ks: Sequence[int] = DEFAULT_KS,
                    gallery_size: int | None = None) -> dict[str, float]:
    """:func:`retrieval_metrics` over all pairs (``gallery_size=None``) or averaged over consecutive galleries of
    exactly ``gallery_size`` pairs (the remainder is left out; fewer pairs than one gallery is an error)."""
    parts = per_gallery_metrics(image_emb, text_emb, image_keys, text_keys, ks, gallery_size)
    return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}


def per_gallery_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, image_keys: Sequence[Hashable],
                        text_keys: Sequence[Hashable], ks: Sequence[int] = DEFAULT_KS,
                        gallery_size: int | None = None) -> list[dict[str, float]]:
    """:func:`retrieval_metrics` of each consecutive gallery of exactly ``gallery_size`` pairs (all pairs as one
    gallery when None; the remainder is left out; fewer pairs than one gallery is an error)."""
    n = image_emb.shape[0]
    if gallery_size is None:
        return [retrieval_metrics(image_emb, text_emb, image_keys, text_keys, ks)]
    if n < gallery_size:
        raise ValueError(f"{n} evaluation pairs cannot fill one gallery of {gallery_size}")
    return [retrieval_metrics(image_emb[i:i + gallery_size], text_emb[i:i + gallery_size],
                              image_keys[i:i + gallery_size], text_keys[i:i + gallery_size], ks)
            for i in range(0, n - gallery_size + 1, gallery_size)]
