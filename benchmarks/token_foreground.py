"""Which vision tokens does CIT keep on the emoji world, and are they the foreground?

On the emoji world (``quality-emoji.md``) ``sjp`` (tokens ranked by CIT, ``token_scorer="attention"``) is far
below ``sjp-random`` (``token_scorer="random"``). Every emoji-world image has an alpha mask, so the true
foreground share of every patch is known; this study measures what each scorer keeps, on the calibrated dense
model of the quality suite (``emoji_bench.make_emoji_bench``, loaded from the dense cache, never retrained):

1. **Scores of the unpruned model.** The scores are read where the search reads them: the model is installed
   with the search's ``AdapterOptions`` (``token_scorer`` from ``TOKEN_SCORERS``), a ``StatsCollector`` is
   attached and enabled, and a train-mode forward with grad on makes every vision layer call its scorer
   (``LayerStep.after_attention``) and hand the scores with the layer's ``TokenState`` to
   ``collector.on_attention``; a subclass records them. All keep ratios are 1, no masks are set.
2. **What a site would keep.** For keep fractions of the 100 prunable patches, the library's own
   ``tokens.select_tokens`` picks the slots from those scores, mapped to patches through ``state.positions``.
   Reported per layer and scorer: foreground recall (kept foreground patches / foreground patches), the share
   of the kept patches that are foreground, the kept share of the foreground mass, next to an oracle (keep by
   true foreground share) and the random scorer. A foreground patch has a share >= ``--fg-threshold``.
3. **Where CIT's top tokens are.** Foreground share of the top-10 patches, the score mass they hold, and how
   often the same positions are in the top-10 across images (an attention sink / register would be the same
   background position everywhere); per-image Spearman correlation of the scores with the foreground share.
4. **Cascade.** All vision sites on at once (one keep ratio at every site, or the keep ratios the ``sjp`` arm
   reached at 0.8 FLOPs removed, read from the suite's stage log): the foreground of the patches that survive all
   sites, through the real site path (the collector sees the surviving slots at the last layer).
5. **R@1 with no fine-tuning** on the same images (galleries of 100) and the image embeddings' cosine to the dense
   ones: one site at a time, or all sites, keeping by CIT, at random, or by the oracle (a scorer installed on the
   sites that ranks by the mask).
6. **What costs the accuracy.** Hybrids that keep CIT's number of emoji and background patches but choose within
   each group by CIT, at random or by spatially clustered random; CIT with the sink positions always kept or
   dropped; each patch's drop-one importance (embedding change when only it is dropped at a site).
7. **Index check.** The patch embedding order (a pixel change in patch (r, c) changes only token 1 + 10 r + c),
   the mask/image alignment (per-patch colour distance from the background vs foreground share), the real site
   path (eval mode: the same scores, the same surviving patches), and three images drawn as grids (foreground
   share, CIT top tokens, oracle) for a check by eye.

    python benchmarks/token_foreground.py     # writes benchmarks/results/token_foreground.{json,md}
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from emoji_bench import make_emoji_bench
from quality_suite.provenance import git_state, versions
from scipy import ndimage
from scipy.stats import spearmanr
from tqdm import tqdm

import comp_vlm
from comp_vlm.adapters.base import AdapterOptions
from comp_vlm.adapters.runtime import attention_scores
from comp_vlm.collect import StatsCollector
from comp_vlm.data.emoji_world import mask_path, patch_foreground, read_mask
from comp_vlm.data.karpathy import read_karpathy
from comp_vlm.dense import cache_key
from comp_vlm.importance import normalize_scores
from comp_vlm.tasks.retrieval import gallery_metrics
from comp_vlm.tokens import TokenState, kept_counts, select_tokens

KEEPS = (0.7, 0.5, 0.3, 0.1)
SCORERS = ("attention", "random")
TOP = 10


# ---- scores as the search sees them -------------------------------------------------------------------------------
class ScoreRecorder(StatsCollector):
    """The search's collector, also keeping the vision tower's token scores and slot states of every layer call."""

    def __init__(self) -> None:
        super().__init__("cip")
        self.enabled = True
        self.calls: dict[int, list[dict[str, torch.Tensor]]] = {}

    def on_attention(self, tower: str, layer: int, scores: torch.Tensor | None, state: Any,
                     head_input: torch.Tensor | None, kind: str = "head") -> None:
        if tower == "vision" and scores is not None:
            self.calls.setdefault(layer, []).append({
                "scores": scores.detach().float().cpu(), "positions": state.positions.cpu(),
                "valid": state.valid.cpu(), "prunable": state.prunable.cpu()})
        super().on_attention(tower, layer, scores, state, head_input, kind)


def installed(dense: torch.nn.Module, scorer: str, seed: int, scorer_fn: Any = None) -> torch.nn.Module:
    """A copy of the dense model installed as the search installs it (pruner.CoMPPruner.__init__)."""
    model = copy.deepcopy(dense)
    adapter = comp_vlm.get_adapter(model)
    adapter.install(AdapterOptions(token_scorer=scorer, token_scorer_seed=seed), scorer=scorer_fn)
    return model


def record_scores(model: torch.nn.Module, pixels: torch.Tensor, batch: int) -> dict[int, dict[str, torch.Tensor]]:
    """Per vision layer: the scores, positions, validity and prunability of every slot, for every image."""
    recorder = ScoreRecorder()
    comp_vlm.get_adapter(model).attach_collector(recorder)
    model.train()
    with torch.enable_grad():
        for start in range(0, len(pixels), batch):
            model.vision_model(pixel_values=pixels[start:start + batch])
    comp_vlm.get_adapter(model).detach_collector()
    model.eval()
    return {layer: {k: torch.cat([c[k] for c in calls]) for k in calls[0]} for layer, calls in recorder.calls.items()}


def patch_scores(rec: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, P) score of every patch (original position - 1) from a full-length record (no site before it)."""
    pos = rec["positions"]
    assert pos.shape[1] == rec["scores"].shape[1] and bool((pos == torch.arange(pos.shape[1])).all()), \
        "a full-length record has slot i at position i"
    return rec["scores"][:, 1:]


def kept_patches(scores: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor, prunable: torch.Tensor,
                 keep: float, n_patches: int) -> torch.Tensor:
    """(N, P) bool: the patches a site keeping ``keep`` of the prunable slots keeps, by ``tokens.select_tokens``."""
    pooled = torch.zeros(len(positions), dtype=torch.long)  # the CLS token, position 0: never prunable
    slots, slot_valid = select_tokens(scores, TokenState(positions, valid, prunable, pooled), keep)
    pos = positions.gather(1, slots)
    out = torch.zeros(len(scores), n_patches + 1, dtype=torch.bool)
    out.scatter_(1, torch.where(slot_valid, pos, torch.zeros_like(pos)), True)
    return out[:, 1:]


def coverage(kept: torch.Tensor, fg: torch.Tensor, threshold: float, objects: torch.Tensor) -> dict[str, float]:
    """Foreground recall, the foreground share of the kept patches, the kept share of the foreground mass, and per
    emoji (``objects`` (N, O, P), each object's own patch shares): the kept share of its mass, and the share of
    the emoji that lose more than half of it or more than 90% of it (an emoji the site all but drops)."""
    is_fg = fg >= threshold
    obj_total = objects.sum(2)
    real = obj_total > 0
    obj_kept = (objects * kept[:, None, :].float()).sum(2)[real] / obj_total[real]
    has = is_fg.any(dim=1)
    recall = (kept & is_fg).sum(1).float()[has] / is_fg.sum(1).float()[has]
    precision = (kept & is_fg).sum(1).float() / kept.sum(1).clamp_min(1).float()
    mass = (kept.float() * fg).sum(1) / fg.sum(1).clamp_min(1e-9)
    return {"fg_recall": float(recall.mean()), "kept_fg_share": float(precision.mean()),
            "fg_mass_kept": float(mass.mean()), "kept": float(kept.sum(1).float().mean()),
            "object_mass_kept": float(obj_kept.mean()), "object_mass_kept_sd": float(obj_kept.std()),
            "objects_half_lost": float((obj_kept < 0.5).float().mean()),
            "objects_lost": float((obj_kept < 0.1).float().mean())}


def oracle_scores(fg: torch.Tensor, seed: int) -> torch.Tensor:
    """(N, 1 + P) scores of the slots of a full-length state: foreground share, ties broken at random; CLS 0."""
    noise = torch.rand(fg.shape, generator=torch.Generator().manual_seed(seed)) * 1e-6
    return torch.cat([torch.zeros(len(fg), 1), fg + noise], dim=1)


def top_positions(scores: torch.Tensor, fg: torch.Tensor, grid: int, threshold: float) -> dict[str, Any]:
    """Where the top-``TOP`` patches by ``scores`` are: their foreground, score mass, and position frequency."""
    top = scores.topk(TOP, dim=1).indices
    freq = torch.zeros(scores.shape[1]).scatter_add_(0, top.flatten(), torch.ones(top.numel())) / len(scores)
    order = freq.argsort(descending=True)[:5]
    in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
    fg_at = [float(fg[in_top[:, p], p].mean()) if bool(in_top[:, p].any()) else float("nan") for p in order.tolist()]
    mass = scores / scores.sum(1, keepdim=True).clamp_min(1e-12)
    rho = [spearmanr(s, f).statistic for s, f in zip(scores.numpy(), fg.numpy()) if f.std() > 0]
    return {
        "top10_mean_fg_share": float(fg.gather(1, top).mean()),
        "top10_fg_fraction": float((fg.gather(1, top) >= threshold).float().mean()),
        "top1_mean_fg_share": float(fg.gather(1, top[:, :1]).mean()),
        "top1_score_mass": float(mass.max(1).values.mean()),
        "top10_score_mass": float(mass.topk(TOP, dim=1).values.sum(1).mean()),
        "max_position_frequency_in_top10": float(freq.max()),
        "top10_slots_on_5_most_frequent_positions": float(freq[order].sum() / TOP),
        "most_frequent_positions": [{"patch": int(p), "row": int(p) // grid, "col": int(p) % grid,
                                     "frequency_in_top10": float(freq[p]), "mean_fg_share_there": fg_at[i],
                                     "mean_fg_share_all_images": float(fg[:, p].mean())}
                                    for i, p in enumerate(order.tolist())],
        "spearman_mean": float(np.mean(rho)), "spearman_sd": float(np.std(rho)),
        "spearman_share_negative": float(np.mean(np.asarray(rho) < 0)), "spearman_images": len(rho),
    }


# ---- data ----------------------------------------------------------------------------------------------------------
def test_images(bench: Any, world: Path, n: int, seed: int, patch: int) -> dict[str, Any]:
    """``n`` test pairs drawn with ``seed`` (pixels and captions as the suite's test loader gives them) and the
    foreground share of every patch, from each image's mask."""
    batches = bench.data.test
    pixels = torch.cat([b["pixel_values"] for b in batches])
    ids = [i for b in batches for i in b["image_ids"]]
    width = max(b["input_ids"].shape[1] for b in batches)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    input_ids = torch.cat([pad(b["input_ids"]) for b in batches])
    attention = torch.cat([pad(b["attention_mask"]) for b in batches])
    captions = [c for b in batches for c in b["captions"]]
    pick = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    root = world / "karpathy"
    by_id = {im.image_id: im for im in read_karpathy(root, splits="test")}
    chosen = [by_id[ids[i]] for i in pick.tolist()]
    masks = [read_mask(mask_path(root, im.path)) for im in chosen]
    fg = torch.tensor(np.stack([patch_foreground(m, patch).reshape(-1) for m in masks]), dtype=torch.float32)
    return {"pixels": pixels[pick], "input_ids": input_ids[pick], "attention_mask": attention[pick],
            "captions": [captions[i] for i in pick.tolist()], "image_ids": [ids[i] for i in pick.tolist()],
            "paths": [str(im.path) for im in chosen], "masks": masks, "fg": fg}


def emoji_objects(masks: list[np.ndarray], patch: int) -> torch.Tensor:
    """(N, O, P) patch shares of each emoji apart: the connected parts of the alpha mask (grown by one pixel, so a
    glyph's own gaps close; emoji lie at least ``min_gap`` = 3 pixels apart), O = the most in one image."""
    per_image = []
    for alpha in masks:
        labels, n = ndimage.label(ndimage.binary_dilation(alpha > 0, iterations=1))
        per_image.append([patch_foreground(np.where(labels == j, alpha, 0), patch).reshape(-1) for j in range(1, n + 1)])
    width = max(len(o) for o in per_image)
    out = torch.zeros(len(masks), width, per_image[0][0].size if per_image[0] else 0)
    for i, objs in enumerate(per_image):
        for j, o in enumerate(objs):
            out[i, j] = torch.from_numpy(o).float()
    return out


def eval_batches(data: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    out = []
    for s in range(0, len(data["image_ids"]), batch):
        mask = data["attention_mask"][s:s + batch]
        cols = mask.any(0)
        out.append({"pixel_values": data["pixels"][s:s + batch], "input_ids": data["input_ids"][s:s + batch][:, cols],
                    "attention_mask": mask[:, cols], "captions": data["captions"][s:s + batch],
                    "image_ids": data["image_ids"][s:s + batch]})
    return out


# ---- checks -------------------------------------------------------------------------------------------------------
class SpyScorer:
    """CIT, recording (positions, scores) of the vision tower at every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, probs: torch.Tensor, head_mask: Any, state: Any, causal: bool) -> torch.Tensor:
        scores = attention_scores(probs, head_mask, state, causal)
        if not causal:
            self.calls.append((state.positions.clone(), scores.clone()))
        return scores


def site_path(dense: torch.nn.Module, pixels: torch.Tensor, recorded: dict[str, torch.Tensor], sites: list[int],
              keep: float, n_patches: int) -> dict[str, Any]:
    """An eval-mode forward with the first site keeping ``keep`` (and the next one 0.99, so that its scorer sees the
    survivors): the first site's scores equal the collector's, and the patches reaching the next site are the ones
    ``kept_patches`` derives from the collector's scores."""
    spy = SpyScorer()
    model = with_keep(installed(dense, "attention", 0, spy), {sites[0]: keep, sites[1]: 0.99})
    with torch.no_grad():
        model.eval().vision_model(pixel_values=pixels)
    (pos0, scores0), (pos1, _) = spy.calls[0], spy.calls[1]
    n = len(pixels)
    expected = kept_patches(recorded["scores"][:n], recorded["positions"][:n], recorded["valid"][:n],
                            recorded["prunable"][:n], keep, n_patches)
    reached = torch.zeros(n, n_patches + 1, dtype=torch.bool).scatter_(1, pos1, True)[:, 1:]
    return {"images": n, "keep": keep, "score_max_abs_diff": float((scores0 - recorded["scores"][:n]).abs().max()),
            "first_site_saw_full_order": bool((pos0 == torch.arange(n_patches + 1)).all()),
            "images_with_other_survivors": int((reached != expected).any(1).sum())}


def embedding_order(model: torch.nn.Module, pixels: torch.Tensor, grid: int, patch: int) -> dict[str, Any]:
    """Change the pixels of patch (r, c) and see which embedding token moves: it must be 1 + grid*r + c."""
    emb = model.vision_model.embeddings
    base = emb(pixels[:1])
    wrong = []
    for r, c in ((0, 0), (0, grid - 1), (grid - 1, 0), (3, 7), (grid - 1, grid - 1)):
        x = pixels[:1].clone()
        x[..., r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] += 1.0
        moved = ((emb(x) - base).abs().amax(-1) > 1e-6)[0].nonzero().flatten().tolist()
        if moved != [1 + grid * r + c]:
            wrong.append({"patch": [r, c], "moved_tokens": moved})
    return {"checked": 5, "wrong": wrong}


def mask_alignment(data: dict[str, Any], bench: Any, patch: int) -> dict[str, float]:
    """Spearman, over all patches, of foreground share vs the patch's mean colour distance from the image's
    background (its median colour): high when the masks line up with the images, row-major."""
    mean = torch.tensor(bench.world_record["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(bench.world_record["image_std"]).view(1, 3, 1, 1)
    raw = data["pixels"] * std + mean
    background = raw.flatten(2).median(dim=2).values[:, :, None, None]
    dist = (raw - background).norm(dim=1)  # (N, S, S)
    n, s, _ = dist.shape
    per_patch = dist.view(n, s // patch, patch, s // patch, patch).mean(dim=(2, 4)).flatten(1)
    aligned = spearmanr(per_patch.flatten(), data["fg"].flatten()).statistic
    transposed = per_patch.view(n, s // patch, s // patch).transpose(1, 2).flatten(1)
    return {"spearman_colour_vs_fg": float(aligned),
            "spearman_colour_vs_fg_transposed": float(spearmanr(transposed.flatten(), data["fg"].flatten()).statistic)}


def grid_text(values: torch.Tensor, grid: int, marks: dict[str, torch.Tensor]) -> list[str]:
    """One image as rows of cells: the foreground share as a digit 0-9 (tenths, '.' for 0), then one grid per mark."""
    rows = []
    for r in range(grid):
        cells = ["." if v == 0 else str(min(9, int(v * 10))) for v in values[r * grid:(r + 1) * grid].tolist()]
        line = " ".join(cells)
        for kept in marks.values():
            line += "   " + " ".join("#" if k else "." for k in kept[r * grid:(r + 1) * grid].tolist())
        rows.append(line)
    return rows


# ---- R@1 with no fine-tuning --------------------------------------------------------------------------------------
class OracleScorer:
    """A TokenScorer for the sites that ranks vision patches by their true foreground share (ties at random), the
    text tower by CIT; ``fg`` is set to the batch's shares before each forward."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self.fg: torch.Tensor | None = None

    def slot_fg(self, state: Any) -> torch.Tensor:
        """(B, n) foreground share of the current slots (0 for CLS)."""
        assert self.fg is not None, "set the batch's foreground first"
        return torch.cat([torch.zeros(len(self.fg), 1), self.fg], dim=1).gather(1, state.positions)

    def noise(self, state: Any) -> torch.Tensor:
        return torch.rand(state.prunable.shape, generator=self.generator)

    def __call__(self, probs: torch.Tensor, head_mask: Any, state: Any, causal: bool) -> torch.Tensor:
        if causal:
            return attention_scores(probs, head_mask, state, causal)
        return normalize_scores(self.slot_fg(state) + 1e-6 * self.noise(state), state.prunable)


class HybridScorer(OracleScorer):
    """Keeps as many emoji patches (share > 0) and background patches as CIT keeps at this site, choosing within each
    group (``fg_rule``, ``bg_rule``) by CIT, at random, or by ``clustered`` random (a noise field smoothed with a
    Gaussian of ``sigma`` patches, so that neighbours go together): which of CIT's choices costs the accuracy."""

    sigma = 2.0

    def clustered(self, state: Any) -> torch.Tensor:
        b, grid = len(state.positions), round((state.full_length - 1) ** 0.5)
        x = torch.arange(-3, 4, dtype=torch.float)
        g = torch.exp(-x**2 / (2 * self.sigma**2))
        kernel = (g[:, None] * g[None, :] / g.sum() ** 2).view(1, 1, 7, 7)
        field = torch.randn(b, 1, grid, grid, generator=self.generator)
        field = torch.nn.functional.conv2d(torch.nn.functional.pad(field, (3, 3, 3, 3), mode="reflect"), kernel)
        return torch.cat([torch.zeros(b, 1), field.flatten(1)], dim=1).gather(1, state.positions)

    def __init__(self, seed: int, keep: float, fg_rule: str, bg_rule: str) -> None:
        super().__init__(seed)
        self.keep, self.fg_rule, self.bg_rule = keep, fg_rule, bg_rule

    def __call__(self, probs: torch.Tensor, head_mask: Any, state: Any, causal: bool) -> torch.Tensor:
        cit = attention_scores(probs, head_mask, state, causal)
        if causal:
            return cit
        emoji = (self.slot_fg(state) > 0) & state.prunable
        k = kept_counts(state.prunable, self.keep)[:, None]
        cit_keep = rank_in(cit, state.prunable) < k
        noise = self.noise(state)
        rules = {"cit": cit, "random": noise, "clustered": self.clustered(state)}
        out = torch.zeros_like(cit)
        for group, rule in ((emoji, self.fg_rule), (state.prunable & ~emoji, self.bg_rule)):
            n = (cit_keep & group).sum(1, keepdim=True)
            out = torch.where(rank_in(rules[rule], group) < n, 1.0, out)
        return normalize_scores(out + 1e-6 * noise, state.prunable)


class ProtectScorer(OracleScorer):
    """CIT, except that the given patch positions always stay (``protect``) or always go."""

    def __init__(self, seed: int, positions: list[int], protect: bool) -> None:
        super().__init__(seed)
        self.positions, self.protect = positions, protect

    def __call__(self, probs: torch.Tensor, head_mask: Any, state: Any, causal: bool) -> torch.Tensor:
        cit = attention_scores(probs, head_mask, state, causal)
        if causal:
            return cit
        cit = cit / cit.amax(1, keepdim=True).clamp_min(1e-12)
        chosen = torch.isin(state.positions, torch.tensor([1 + p for p in self.positions]))
        return normalize_scores(torch.where(chosen, 2.0 if self.protect else 0.0, cit), state.prunable)


class DropOneScorer(OracleScorer):
    """Drops the slot ``drop[b]`` of sample b (with keep ratio 0.99 a site keeps 99 of 100 patches)."""

    def __init__(self, drop: torch.Tensor) -> None:
        super().__init__(0)
        self.drop = drop

    def __call__(self, probs: torch.Tensor, head_mask: Any, state: Any, causal: bool) -> torch.Tensor:
        if causal:
            return attention_scores(probs, head_mask, state, causal)
        scores = torch.ones(state.prunable.shape)
        scores[torch.arange(len(scores)), self.drop] = 0.0
        return normalize_scores(scores, state.prunable)


def rank_in(scores: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(B, n) rank of each slot by ``scores`` (0 = best) among the slots of ``group``; outside it n or more."""
    masked = torch.where(group, scores.float(), torch.full_like(scores, -1.0, dtype=torch.float) - 1e9)
    return masked.argsort(dim=1, descending=True, stable=True).argsort(dim=1)


def retrieval(bench: Any, model: torch.nn.Module, batches: list[dict[str, Any]], oracle: OracleScorer | None,
              fg: torch.Tensor, dense_emb: torch.Tensor | None) -> dict[str, Any]:
    """R@1 (galleries of the task's size) and the image embeddings' cosine similarity to the dense model's."""
    def feed():
        start = 0
        for b in batches:
            if oracle is not None:
                oracle.fg = fg[start:start + len(b["image_ids"])]
            start += len(b["image_ids"])
            yield b

    task = bench.task
    e = task.embed(model, feed())
    r1 = gallery_metrics(e["image_emb"], e["text_emb"], e["image_keys"], e["text_keys"], task.ks,
                         task.gallery_size)["r1_mean"]
    cos = None if dense_emb is None else float(torch.nn.functional.cosine_similarity(e["image_emb"], dense_emb).mean())
    return {"r1": r1, "cos_to_dense": cos, "image_emb": e["image_emb"]}


def with_keep(model: torch.nn.Module, keeps: dict[int, float]) -> torch.nn.Module:
    """``model`` with the vision sites' keep ratios set (1 at the sites not named)."""
    adapter = comp_vlm.get_adapter(model)
    for layer in adapter.site_layers(adapter.tower("vision")):
        adapter.set_keep_ratio("vision", layer, keeps.get(layer, 1.0))
    return model


def sjp_plan(stages: Path, ratio: str = "0.8") -> dict[int, float] | None:
    """The vision keep ratios the ``sjp`` arm reached at ``ratio`` (seed 0) in the quality suite's stage log."""
    if not stages.is_file():
        return None
    for line in stages.read_text().splitlines():
        row = json.loads(line)
        if row.get("arm") == "sjp" and row.get("seed") == 0 and ratio in row.get("layers", {}):
            keeps = {i: float(layer["keep"]) for i, layer in enumerate(row["layers"][ratio]["vision"])}
            return {i: k for i, k in keeps.items() if k < 1.0}
    return None


def drop_one_importance(bench: Any, dense: torch.nn.Module, pixels: torch.Tensor, layer: int,
                        n_patches: int) -> torch.Tensor:
    """(N, P) 1 - cosine(image embedding with patch p dropped at the site of ``layer``, dense embedding)."""
    out = torch.zeros(len(pixels), n_patches)
    scorer = DropOneScorer(torch.arange(1, n_patches + 1))
    model = with_keep(installed(dense, "attention", 0, scorer), {layer: 1 - 1 / n_patches})
    with torch.no_grad():
        base = bench.task.encode_images(dense.eval(), pixels)
        for i in range(len(pixels)):
            emb = bench.task.encode_images(model.eval(), pixels[i:i + 1].expand(n_patches, -1, -1, -1))
            out[i] = 1 - torch.nn.functional.cosine_similarity(emb, base[i:i + 1])
    return out


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="data/emoji-world")
    parser.add_argument("--cache", default="cache", help="the dense cache (the model is never retrained)")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fg-threshold", type=float, default=0.5)
    parser.add_argument("--eval-keeps", default="0.7,0.5,0.3", help="keep ratios of the R@1 part ('' skips it)")
    parser.add_argument("--drop-one-images", type=int, default=60, help="images of the drop-one importance part")
    parser.add_argument("--stages", default="benchmarks/results/quality-emoji_stages.jsonl",
                        help="the quality suite's stage log (the sjp arm's keep ratios)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    world = Path(args.world)
    bench = make_emoji_bench(world)
    bench.cache_dir = args.cache
    key = cache_key(bench.config(), bench.settings.dense, bench.data_id())
    if not (Path(args.cache) / f"dense-{key}.safetensors").is_file():
        raise SystemExit(f"no cached dense model {key} in {args.cache}; this study does not train one")
    dense, dense_metrics = bench.dense(progress=False)
    vc = dense.config.vision_config
    patch, grid = vc.patch_size, vc.image_size // vc.patch_size
    adapter = comp_vlm.get_adapter(installed(dense, "attention", args.seed))
    sites = adapter.site_layers(adapter.tower("vision"))
    data = test_images(bench, world, args.images, args.seed, patch)
    fg = data["fg"]
    objects = emoji_objects(data["masks"], patch)
    is_fg = fg >= args.fg_threshold
    result: dict[str, Any] = {
        "command": "python benchmarks/token_foreground.py" + (f" {' '.join(argv)}" if argv else ""),
        "commit": git_state(Path(__file__).resolve().parents[1])[0], "versions": versions(), "config": vars(args),
        "task": {"name": "retrieval", "gallery_size": bench.task.gallery_size, "metric": "r1_mean"},
        "model": bench.settings.name, "dense_id": key, "dense_val_r1": dense_metrics["r1_mean"],
        "world": str(world), "world_id": bench.data_id(), "images": len(fg), "seed": args.seed, "fg_threshold": args.fg_threshold,
        "patches": grid * grid, "vision_layers": vc.num_hidden_layers, "vision_sites": sites,
        "fg_patch_fraction": float(is_fg.float().mean()), "mean_fg_share": float(fg.mean()), "fg_any_fraction": float((fg > 0).float().mean()),
        "fg_patches_per_image": float(is_fg.sum(1).float().mean()),
        "images_without_fg_patch": int((~is_fg.any(1)).sum()),
        "emoji_per_image": float((objects.sum(2) > 0).sum(1).float().mean()),
    }

    # 1-3: scores of the unpruned model at every layer
    recorded = {name: record_scores(installed(dense, name, args.seed), data["pixels"], 250)
                for name in tqdm(SCORERS, desc="scores")}
    full = torch.ones(len(fg), 1 + grid * grid, dtype=torch.bool)
    prunable = full.clone()
    prunable[:, 0] = False
    positions = torch.arange(1 + grid * grid).expand(len(fg), -1)
    oracle_kept = {k: kept_patches(oracle_scores(fg, args.seed), positions, full, prunable, k, grid * grid)
                   for k in KEEPS}
    result["oracle"] = {str(k): coverage(oracle_kept[k], fg, args.fg_threshold, objects) for k in KEEPS}
    result["layers"] = {}
    for layer in sorted(recorded["attention"]):
        entry: dict[str, Any] = {"site": layer in sites}
        for name in SCORERS:
            rec = recorded[name][layer]
            patch_scores(rec)  # checks the record is full length, slot i = position i
            entry[name] = {str(k): coverage(kept_patches(rec["scores"], rec["positions"], rec["valid"],
                                                         rec["prunable"], k, grid * grid), fg, args.fg_threshold, objects)
                           for k in KEEPS}
            entry[name]["cls_score"] = float(rec["scores"][:, 0].abs().max())
        entry["attention_top"] = top_positions(patch_scores(recorded["attention"][layer]), fg, grid, args.fg_threshold)
        entry["random_top"] = {k: v for k, v in top_positions(patch_scores(recorded["random"][layer]), fg, grid,
                                                              args.fg_threshold).items()
                               if k.startswith(("spearman", "top10_mean", "max_position"))}
        result["layers"][str(layer)] = entry

    # 4: cascade through the real sites (the collector at the last layer sees the slots that survived every site)
    result["cascade"] = {}
    plans = {f"{k} at every site": dict.fromkeys(sites, k) for k in (0.7, 0.5)}
    sjp = sjp_plan(Path(args.stages))
    if sjp is not None:
        plans["sjp at 0.8 (seed 0): " + ", ".join(f"{k:.2f}" for k in sjp.values())] = sjp
    result["plans"] = {label: {str(k): v for k, v in plan.items()} for label, plan in plans.items()}
    for label, plan in tqdm(plans.items(), desc="cascade"):
        row = {}
        for name in SCORERS:
            model = with_keep(installed(dense, name, args.seed), plan)
            last = record_scores(model, data["pixels"], 250)[vc.num_hidden_layers - 1]
            alive = torch.zeros(len(fg), 1 + grid * grid, dtype=torch.bool)
            alive.scatter_(1, torch.where(last["valid"], last["positions"], 0), True)
            row[name] = coverage(alive[:, 1:], fg, args.fg_threshold, objects)
        row["oracle"] = coverage(kept_patches(oracle_scores(fg, args.seed), positions, full, prunable,
                                              row["attention"]["kept"] / (grid * grid), grid * grid),
                                 fg, args.fg_threshold, objects)
        result["cascade"][label] = row

    # 5: R@1 without fine-tuning, the same images in galleries of 100
    batches = eval_batches(data, 250)
    dense_eval = retrieval(bench, dense, batches, None, fg, None)
    result["r1"] = {"dense": dense_eval["r1"], "single_site": {}, "all_sites": {}}
    keeps = [float(k) for k in args.eval_keeps.split(",") if k]
    jobs = [(str(s), str(k), {s: k}) for s in sites for k in keeps] + [("all", label, p) for label, p in plans.items()]

    def evaluate(scorer: OracleScorer | None, name: str, plan: dict[int, float]) -> dict[str, float]:
        model = with_keep(installed(dense, name, args.seed, scorer), plan)
        got = retrieval(bench, model, batches, scorer, fg, dense_eval["image_emb"])
        return {"r1": got["r1"], "cos_to_dense": got["cos_to_dense"]}

    for where, keep, plan in tqdm(jobs, desc="R@1"):
        row = {name: evaluate(None, name, plan) for name in SCORERS}
        row["oracle"] = evaluate(OracleScorer(args.seed), "attention", plan)
        target = result["r1"]["all_sites" if where == "all" else "single_site"]
        target.setdefault(where, {})[keep] = row

    # 6: what costs the accuracy: CIT's choice among the emoji patches or among the background; the sink positions;
    # each patch's own importance to the embedding
    registers = [p["patch"] for p in result["layers"][str(sites[-1])]["attention_top"]["most_frequent_positions"][:3]]
    decomposition: dict[str, Any] = {"registers": registers, "hybrid": {}, "registers_r1": {}, "drop_one": {}}
    for site, keep in tqdm(((sites[0], 0.7), (sites[0], 0.5), (sites[1], 0.5), (sites[2], 0.5)), desc="decomposition"):
        label = f"{site}@{keep}"
        decomposition["hybrid"][label] = {
            f"emoji:{f}/background:{b}": evaluate(HybridScorer(args.seed, keep, f, b), "attention", {site: keep})
            for f, b in (("cit", "cit"), ("random", "random"), ("cit", "random"), ("random", "cit"),
                         ("clustered", "clustered"))}
        decomposition["registers_r1"][label] = {
            "cit": result["r1"]["single_site"][str(site)].get(str(keep), {}).get("attention"),
            "cit, registers kept": evaluate(ProtectScorer(args.seed, registers, True), "attention", {site: keep}),
            "cit, registers dropped": evaluate(ProtectScorer(args.seed, registers, False), "attention", {site: keep})}
    n_drop = min(args.drop_one_images, len(fg))
    for site in tqdm(sites, desc="drop-one"):
        imp = drop_one_importance(bench, dense, data["pixels"][:n_drop], site, grid * grid)
        cit = patch_scores(recorded["attention"][site])[:n_drop]
        f = fg[:n_drop]
        emoji = f > 0
        within = [spearmanr(c[e], x[e]).statistic for c, x, e in zip(cit.numpy(), imp.numpy(), emoji.numpy())
                  if e.sum() >= 5]
        dropped = cit.argsort(1)[:, :30]  # CIT's drops at keep 0.7
        emoji_dropped = emoji.gather(1, dropped)
        top = imp.topk(TOP, dim=1).indices
        decomposition["drop_one"][str(site)] = {
            "images": n_drop,
            "spearman_cit_importance": float(np.mean([spearmanr(c, x).statistic for c, x in zip(cit.numpy(), imp.numpy())])),
            "spearman_cit_importance_within_emoji": float(np.nanmean(within)),
            "spearman_fg_importance": float(np.mean([spearmanr(a, x).statistic for a, x in zip(f.numpy(), imp.numpy())
                                                     if a.std() > 0])),
            "importance_cit_dropped_at_0.7_over_mean": float(imp.gather(1, dropped).mean() / imp.mean()),
            "importance_cit_dropped_emoji_over_mean_emoji": float(imp.gather(1, dropped)[emoji_dropped].mean()
                                                                   / imp[emoji].mean()),
            "fg_share_of_10_most_important": float(f.gather(1, top).mean()),
            "registers_among_10_most_important": [float((top == p).any(1).float().mean()) for p in registers]}
    result["decomposition"] = decomposition

    # 7: index checks
    result["index_check"] = {"embedding_order": embedding_order(dense, data["pixels"], grid, patch),
                             "mask_alignment": mask_alignment(data, bench, patch),
                             "site_path": site_path(dense, data["pixels"][:250], recorded["attention"][sites[0]],
                                                    sites, 0.7, grid * grid)}
    first = str(sites[0])
    examples = []
    for i in range(3):
        cit = patch_scores(recorded["attention"][int(first)])[i]
        n_fg = int(is_fg[i].sum())
        k = max(n_fg, 1)
        cit_top = torch.zeros(grid * grid, dtype=torch.bool).scatter_(0, cit.topk(k).indices, True)
        orc = torch.zeros(grid * grid, dtype=torch.bool).scatter_(0, fg[i].topk(k).indices, True)
        examples.append({"path": data["paths"][i], "caption": data["captions"][i], "fg_patches": n_fg,
                         "cit_layer": int(first), "cit_top_k_fg_hits": int((cit_top & is_fg[i]).sum()),
                         "grid": grid_text(fg[i], grid, {"cit": cit_top, "oracle": orc})})
    result["index_check"]["examples"] = examples
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "token_foreground.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "token_foreground.md").write_text("\n".join(render(result)) + "\n")
    print("\n".join(render(result)))
    return 0


def _f(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"


def summary(res: dict[str, Any]) -> list[str]:
    """The measurements that answer the question, in a few lines (numbers from this run)."""
    first, last = (str(s) for s in (res["vision_sites"][0], res["vision_sites"][-1]))
    at = res["layers"][first]
    r1 = res["r1"]["single_site"][first].get("0.7")
    hyb = res["decomposition"]["hybrid"].get(f"{first}@0.7")
    sinks = res["layers"][last]["attention_top"]["most_frequent_positions"][:3]
    lines = ["## Summary", "",
             (f"- CIT does rank foreground up: at the sites it keeps {_f(min(res['layers'][str(s)]['attention']['0.5']['fg_recall'] for s in res['vision_sites']))}"
              f"-{_f(max(res['layers'][str(s)]['attention']['0.5']['fg_recall'] for s in res['vision_sites']))} of the "
              "foreground patches when it keeps half (random 0.50, oracle "
              f"{_f(res['oracle']['0.5']['fg_recall'])}); Spearman with the foreground share "
              f"{_f(min(res['layers'][str(s)]['attention_top']['spearman_mean'] for s in res['vision_sites']))}-"
              f"{_f(max(res['layers'][str(s)]['attention_top']['spearman_mean'] for s in res['vision_sites']))}.")]
    if r1 is not None:
        lines.append(f"- Yet one site at layer {first} keeping 0.7, no fine-tuning: R@1 CIT {_f(r1['attention']['r1'])}, "
                     f"random {_f(r1['random']['r1'])}, foreground oracle {_f(r1['oracle']['r1'])} "
                     f"(dense {_f(res['r1']['dense'])}).")
    if hyb is not None:
        lines.append(
            f"- The loss is CIT's choice among the emoji patches: with CIT's counts, emoji by CIT / background at random "
            f"{_f(hyb['emoji:cit/background:random']['r1'])}, emoji at random / background by CIT "
            f"{_f(hyb['emoji:random/background:cit']['r1'])}; clustered random (neighbours dropped together) "
            f"{_f(hyb['emoji:clustered/background:clustered']['r1'])}. CIT drops emoji unevenly: "
            f"{_f(at['attention']['0.7']['objects_half_lost'])} of the emoji lose more than half their mass (random "
            f"{_f(at['random']['0.7']['objects_half_lost'])}; per-emoji kept mass sd "
            f"{_f(at['attention']['0.7']['object_mass_kept_sd'])} vs {_f(at['random']['0.7']['object_mass_kept_sd'])}).")
    lines.append(f"- Sinks at layer {last}: " + ", ".join(
        f"({p['row']},{p['col']}) in CIT's top-10 of {100 * p['frequency_in_top10']:.0f}% of the images "
        f"(fg share {_f(p['mean_fg_share_there'])})" for p in sinks) + ".")
    for label, v in res["r1"]["all_sites"].get("all", {}).items():
        if label.startswith("sjp"):
            lines.append(f"- The sjp arm's token plan ({label}), no fine-tuning: R@1 CIT {_f(v['attention']['r1'])}, "
                         f"random {_f(v['random']['r1'])}, oracle {_f(v['oracle']['r1'])}.")
    return [*lines, ""]


def render(res: dict[str, Any]) -> list[str]:
    lines = [
        "# Which vision tokens does CIT keep on the emoji world?", "", f"Command: `{res['command']}`", "",
        (f"Model `{res['model']}` (dense `{res['dense_id']}`, val R@1 {res['dense_val_r1']:.2f}), {res['images']} test "
         f"images (seed {res['seed']}), {res['patches']} patches each. Foreground patch: share >= {res['fg_threshold']}"
         f" ({100 * res['fg_patch_fraction']:.1f}% of the patches, {res['fg_patches_per_image']:.1f} per image; "
         f"{100 * res['fg_any_fraction']:.1f}% touch an emoji; {res['emoji_per_image']:.2f} emoji per image). Vision sites: layers {res['vision_sites']}; scores "
         "of every layer read from the unpruned model through the search's collector."), "",
        *summary(res),
        "## Foreground kept by a site at each keep fraction (unpruned model, one site)", "",
        "recall = kept foreground patches / foreground patches; fg share = foreground patches / kept patches.", "",
        "| layer | scorer | " + " | ".join(f"recall @{k} | fg share @{k}" for k in KEEPS) + " |",
        "|---|---|" + "---|---|" * len(KEEPS),
    ]

    def row(label: str, name: str, cov: dict) -> str:
        return (f"| {label} | {name} | "
                + " | ".join(f"{_f(cov[str(k)]['fg_recall'])} | {_f(cov[str(k)]['kept_fg_share'])}" for k in KEEPS)
                + " |")

    lines.append(row("any", "oracle", res["oracle"]))
    for layer, entry in res["layers"].items():
        label = layer + ("" if entry["site"] else " (no site)")
        for name in SCORERS:
            lines.append(row(label, "CIT" if name == "attention" else name, entry[name]))
    lines += ["", ("Per emoji (its alpha mass kept by the site): mean ± sd over emoji / share of emoji that lose more "
                   "than half / share that lose more than 90% (all but dropped)."), "",
              "| layer | scorer | " + " | ".join(f"@{k}" for k in KEEPS) + " |",
              "|---|---|" + "---|" * len(KEEPS)]

    def obj_row(label: str, name: str, cov: dict) -> str:
        return (f"| {label} | {name} | " + " | ".join(
            f"{_f(cov[str(k)]['object_mass_kept'])} ± {_f(cov[str(k)]['object_mass_kept_sd'])} / "
            f"{_f(cov[str(k)]['objects_half_lost'])} / {_f(cov[str(k)]['objects_lost'])}" for k in KEEPS) + " |")

    lines.append(obj_row("any", "oracle", res["oracle"]))
    for layer, entry in res["layers"].items():
        if entry["site"]:
            for name in SCORERS:
                lines.append(obj_row(layer, "CIT" if name == "attention" else name, entry[name]))
    lines += ["", "## Where CIT's top-10 tokens are", "",
              (f"Mean foreground share of a patch: {_f(res['mean_fg_share'])}. The random scorer's values in "
               "brackets."), "",
              ("| layer | fg share of top-10 (random) | top-10 that are fg | score mass of top-1 / top-10 | "
              "max position frequency in top-10 (random) | top-10 slots on the 5 most frequent positions | "
              "most frequent positions (row,col: freq, fg share there) | Spearman CIT vs fg (sd; share < 0) "
              "[random] |"), "|---|---|---|---|---|---|---|---|"]
    for layer, entry in res["layers"].items():
        a, r = entry["attention_top"], entry["random_top"]
        where = "; ".join(f"({p['row']},{p['col']}): {_f(p['frequency_in_top10'])}, {_f(p['mean_fg_share_there'])}"
                          for p in a["most_frequent_positions"][:3])
        lines.append(
            f"| {layer} | {_f(a['top10_mean_fg_share'])} ({_f(r['top10_mean_fg_share'])}) | "
            f"{_f(a['top10_fg_fraction'])} | {_f(a['top1_score_mass'])} / {_f(a['top10_score_mass'])} | "
            f"{_f(a['max_position_frequency_in_top10'])} ({_f(r['max_position_frequency_in_top10'])}) | "
            f"{_f(a['top10_slots_on_5_most_frequent_positions'])} | {where} | "
            f"{_f(a['spearman_mean'])} ({_f(a['spearman_sd'])}; {_f(a['spearman_share_negative'])}) "
            f"[{_f(r['spearman_mean'])}] |")
    lines += ["", "## Cascade: every site on at once (real site path, no fine-tuning)", "",
              ("Foreground of the patches that survive all sites, as recall / fg share / emoji lost; oracle = the same "
               "number of patches by true share. The sjp plan is the arm's vision keep ratios at 0.8 FLOPs removed "
               "(sites 1-4, each relative to the tokens reaching it)."), "",
              "| keep ratios | patches left | CIT | random | oracle |", "|---|---|---|---|---|"]
    for plan, row_ in res["cascade"].items():
        lines.append(f"| {plan} | {row_['attention']['kept']:.1f} | " + " | ".join(
            f"{_f(row_[n]['fg_recall'])} / {_f(row_[n]['kept_fg_share'])} / {_f(row_[n]['objects_lost'])}"
            for n in ("attention", "random", "oracle")) + " |")
    r1s = res["r1"]
    lines += ["", (f"## R@1 without fine-tuning (the same {res['images']} images, galleries of 100; dense "
              f"{_f(r1s['dense'])})"), "",
              "R@1, and in brackets the mean cosine similarity of the image embeddings to the dense model's.", "",
              "| sites | keep ratios | CIT | random | oracle |", "|---|---|---|---|---|"]
    for label, per in [*r1s["single_site"].items(), *r1s["all_sites"].items()]:
        for keep, v in per.items():
            lines.append(f"| {label} | {keep} | " + " | ".join(
                f"{_f(v[n]['r1'])} ({_f(v[n]['cos_to_dense'], 3)})" for n in ("attention", "random", "oracle")) + " |")
    dec = res["decomposition"]
    pos = ", ".join(f"({p // 10},{p % 10})" for p in dec["registers"])
    lines += ["", "## What costs the accuracy (one site, no fine-tuning; R@1 (cosine to dense))", "",
              ("Hybrids keep exactly as many emoji patches (share > 0) and background patches as CIT keeps in each "
               "image, and choose within each group by CIT, at random, or by clustered random (a Gaussian-smoothed "
               "noise field, sigma 2 patches: neighbours dropped together)."), "",
              "| site@keep | " + " | ".join(next(iter(dec["hybrid"].values()))) + " |",
              "|---|" + "---|" * len(next(iter(dec["hybrid"].values())))]
    for label, row_ in dec["hybrid"].items():
        lines.append(f"| {label} | " + " | ".join(f"{_f(v['r1'])} ({_f(v['cos_to_dense'], 3)})"
                                                  for v in row_.values()) + " |")
    lines += ["", f"Sink positions (CIT's most frequent top-10 at the last site): {pos}.", "",
              "| site@keep | CIT | CIT, sinks always kept | CIT, sinks always dropped |", "|---|---|---|---|"]
    for label, row_ in dec["registers_r1"].items():
        lines.append(f"| {label} | " + " | ".join("" if v is None else f"{_f(v['r1'])} ({_f(v['cos_to_dense'], 3)})"
                                                  for v in row_.values()) + " |")
    lines += ["", ("Drop-one importance: 1 - cosine(embedding with one patch dropped at the site, dense embedding), "
                   f"every patch of {next(iter(dec['drop_one'].values()))['images']} images."), "",
              ("| site | Spearman CIT vs importance | within emoji patches | Spearman fg share vs importance | "
               "importance of CIT's 30 lowest / mean | of its emoji patches / mean emoji patch | fg share of the 10 "
               f"most important | sinks {pos} among the 10 most important |"), "|---|---|---|---|---|---|---|---|"]
    for site, d in dec["drop_one"].items():
        lines.append(f"| {site} | {_f(d['spearman_cit_importance'])} | {_f(d['spearman_cit_importance_within_emoji'])} | "
                     f"{_f(d['spearman_fg_importance'])} | {_f(d['importance_cit_dropped_at_0.7_over_mean'])} | "
                     f"{_f(d['importance_cit_dropped_emoji_over_mean_emoji'])} | "
                     f"{_f(d['fg_share_of_10_most_important'])} | "
                     f"{', '.join(_f(x) for x in d['registers_among_10_most_important'])} |")
    ic = res["index_check"]
    lines += ["", "## Index checks", "",
              (f"- Patch embedding order: a pixel change in patch (r, c) moves only token 1 + {res['patches'] ** 0.5:.0f}"
               f"r + c: {ic['embedding_order']['checked'] - len(ic['embedding_order']['wrong'])}/"
               f"{ic['embedding_order']['checked']} patches right {ic['embedding_order']['wrong'] or ''}"),
              (f"- Masks line up with the images: Spearman of a patch's colour distance from the background with its "
               f"foreground share {_f(ic['mask_alignment']['spearman_colour_vs_fg'])} (the mask transposed: "
               f"{_f(ic['mask_alignment']['spearman_colour_vs_fg_transposed'])})."),
              (f"- The real site path (eval mode, site {res['vision_sites'][0]} keeping "
               f"{ic['site_path']['keep']}, {ic['site_path']['images']} images): its scores differ from the collector's "
               f"by at most {ic['site_path']['score_max_abs_diff']:.1e}; it saw the slots in position order "
               f"({ic['site_path']['first_site_saw_full_order']}); the patches reaching the next site differ from the "
               f"ones derived here in {ic['site_path']['images_with_other_survivors']} images."),
              ("- Every recorded unpruned score row has slot i at position i (CLS at 0, patches row-major after it);"
               " the CLS slot always scores 0 (max |score| "
               f"{max(e['attention']['cls_score'] for e in res['layers'].values()):.1e})."), "",
              ("Examples: foreground share (tenths), then CIT's top-k at the first site and the oracle's top-k "
               "(k = the image's foreground patches)."), ""]
    for ex in ic["examples"]:
        lines += [(f"`{Path(ex['path']).name}` ({ex['caption']!r}): {ex['fg_patches']} foreground patches, "
                   f"{ex['cit_top_k_fg_hits']} in CIT's top-{max(ex['fg_patches'], 1)} at layer {ex['cit_layer']}"), "",
                  "```", *ex["grid"], "```", ""]
    lines.append(f"Wall time {res['wall_s']:.0f} s (CPU, 1 thread).")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
