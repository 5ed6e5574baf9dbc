"""The library on a CUDA device (``pytest -m gpu tests/test_cuda.py``; every test is skipped without one).

The rest of the suite runs on the CPU; this file runs on cuda what a device could break:

- the adapter contract: keep-all == unmodified, hard-masked == sliced (eager and sdpa), the FLOPs model ==
  FlopCounterMode, a padded batch == each sample alone, gradient checkpointing, save -> load;
- the random token scorer draws the same noise on cuda as on the CPU;
- a seeded ``prune`` end to end (attention and random token scorers, token stages included): the pruned model
  computes on cuda what it computes moved to the CPU, its FLOPs bookkeeping is self-consistent, save -> load
  round-trips on cuda and on the CPU, and a search resumed from its checkpoint (read back on the CPU) finishes;
- the search state read back on the CPU (a checkpoint) keeps collecting statistics on cuda;
- the CLI: ``comp-vlm prune --device cuda`` on the quick built-in, then ``eval`` (cuda == CPU) and ``bench``;
- measured latency (:mod:`comp_vlm.measure`) on cuda.

TF32 is turned off for the module (cuDNN convolutions, CLIP's patch embedding, default to it on Ampere and later:
~1e-3 relative error), so cuda and the CPU agree to float32 rounding.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from contract.families import CASES, Case, all_sites, call, case_id, random_unit_masks
from tiny_clip import REF, fresh, quick, tiny_setup
from torch.utils.flop_counter import FlopCounterMode

import comp_vlm
from comp_vlm import AdapterOptions, Pruner, get_adapter, load_pruned, prune, save_pruned
from comp_vlm.adapters.runtime import RandomScorer, uniform_scores
from comp_vlm.cli import main
from comp_vlm.measure import bench_inputs, interleaved_latency_ms
from comp_vlm.tasks.retrieval import RetrievalTask
from comp_vlm.tokens import TokenState
from comp_vlm.training import cycle_batches

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
ATOL = 1e-4  # cuda against the CPU, or two computations on cuda that slice differently (float32 rounding)


@pytest.fixture(autouse=True, scope="module")
def ieee_float32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def moved(inputs: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def assert_close(got, want, what: str, atol: float = ATOL) -> None:
    """Every tensor of ``got`` equals the one of ``want`` (any devices) to ``atol``; the message names the worst."""
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        g, w = g.detach().float().cpu(), w.detach().float().cpu()
        assert torch.isfinite(g).all(), f"{what}: output {i} is not finite"
        diff = (g - w).abs().max().item() if g.numel() else 0.0
        assert torch.allclose(g, w, atol=atol, rtol=atol), \
            f"{what}: output {i} differs by up to {diff:.3e} (atol {atol:g}, max |value| {w.abs().max().item():.3g})"


def assert_on(model: torch.nn.Module, device: torch.device, what: str) -> None:
    """Every parameter and buffer of ``model`` (masks included) lives on ``device``."""
    stray = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type != device.type]
    assert not stray, f"{what}: {len(stray)} tensors are not on {device.type}, e.g. {stray[:3]}"




# ---- the adapter contract on cuda --------------------------------------------------------------------------------
@pytest.fixture(params=sorted(CASES), ids=case_id)
def case(request) -> Case:
    return CASES[request.param]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_unmodified_on_cuda(case, attn):
    batch = case.batch()
    on_cpu = call(case, case.make(0, attn), batch)
    model = case.make(0, attn).to(CUDA)
    ref = call(case, model, moved(batch, CUDA))
    assert_close(ref, on_cpu, f"{case.family} ({attn}) unmodified model: cuda vs CPU")
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    all_sites(adapter, 1.0)
    assert_close(call(case, model, moved(batch, CUDA)), ref, f"{case.family} ({attn}): keep ratio 1 vs unmodified")


@pytest.mark.parametrize("attn,keep", [("eager", 1.0), ("eager", 0.5), ("sdpa", 0.5)])
def test_hard_masked_equals_sliced_on_cuda(case, attn, keep):
    model = case.make(1, attn).to(CUDA)
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 1)  # masks made on the CPU, stored on the model's device
    all_sites(adapter, keep)
    assert_on(model, CUDA, "masked model")
    batch = moved(case.batch(), CUDA)
    masked = call(case, model, batch)
    params = sum(p.numel() for p in model.parameters())
    adapter.slice()
    assert sum(p.numel() for p in model.parameters()) < params, "slicing removed nothing"
    assert_on(model, CUDA, "sliced model")
    assert_close(call(case, model, batch), masked, f"{case.family} ({attn}, keep {keep}): sliced vs hard-masked")
    cpu_copy = copy.deepcopy(model).to(CPU)
    assert_close(call(case, cpu_copy, case.batch()), masked, f"{case.family} ({attn}, keep {keep}): sliced, CPU vs cuda")


@pytest.mark.parametrize("tokens", [False, True])
def test_flops_model_equals_flop_counter_on_cuda(case, tokens):
    model = case.make(2, "eager").to(CUDA)
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 2)
    if tokens:
        all_sites(adapter, 0.6)
    adapter.slice()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        case.features(model, moved(case.at_reference(model, case.reference), CUDA))
    assert adapter.count_flops(case.reference) == counter.get_total_flops(), \
        f"FLOPs model {adapter.count_flops(case.reference)} != FlopCounterMode {counter.get_total_flops()} on cuda"


@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_padded_batch_equals_each_sample_alone_on_cuda(case, keep):
    model = case.make(4, "eager").to(CUDA)
    adapter = get_adapter(model).install()
    all_sites(adapter, keep)
    batch = case.batch()
    together = call(case, model, moved(batch, CUDA))
    for i in range(len(together[0])):
        alone = call(case, model, moved(case.sample(batch, i), CUDA))
        assert_close(tuple(t[i:i + 1] for t in together), alone, f"sample {i} in the padded batch vs alone")


def test_gradient_checkpointing_gives_the_same_gradients_on_cuda(case):
    grads = []
    for checkpointing in (False, True):
        model = case.make(5, "eager").to(CUDA)
        adapter = get_adapter(model).install()
        all_sites(adapter, 0.5)
        random_unit_masks(adapter, 5)
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        case.loss(model, moved(case.batch(), CUDA)).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert_close((grads[1][name],), (grads[0][name],), f"gradient of {name} with checkpointing")


def test_save_load_round_trip_on_cuda(case, tmp_path):
    model = case.make(3, "eager").to(CUDA)
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 3)
    all_sites(adapter, 0.5)
    adapter.slice()
    batch = case.batch()
    ref = call(case, model, moved(batch, CUDA))
    save_pruned(model, tmp_path / "pruned")  # cuda tensors written through the CPU
    loaded = load_pruned(tmp_path / "pruned", device="cuda")
    assert_on(loaded, CUDA, "load_pruned(device='cuda')")
    assert_close(call(case, loaded, moved(batch, CUDA)), ref, "loaded on cuda vs saved", atol=1e-6)
    assert_close(call(case, load_pruned(tmp_path / "pruned"), batch), ref, "loaded on the CPU vs saved on cuda")
    assert get_adapter(loaded).recipe().to_dict()["towers"] == adapter.recipe().to_dict()["towers"]


# ---- the random token scorer ---------------------------------------------------------------------------------------
def test_random_scores_are_the_same_noise_on_cuda():
    states = {d: TokenState.start(3, 7, d) for d in (CPU, CUDA)}
    probs = {d: torch.rand(3, 2, 7, 7).to(d) for d in (CPU, CUDA)}
    for seed in (0, 5):
        on_cpu = uniform_scores(probs[CPU], None, states[CPU], False, seed=seed)
        on_cuda = uniform_scores(probs[CUDA], None, states[CUDA], False, seed=seed)
        assert on_cuda.device.type == "cuda"
        # the noise is drawn on the CPU, so it is the same draw; only the normalisation runs on the device (its
        # division may differ in the last bit, as seen on an H100): same ranking, equal to float rounding
        torch.testing.assert_close(on_cuda.cpu(), on_cpu, rtol=1e-6, atol=0, msg=f"seed {seed}: noise differs")
        assert torch.equal(on_cuda.cpu().argsort(-1), on_cpu.argsort(-1)), f"seed {seed}: ranking differs"
    scorers = (RandomScorer(3), RandomScorer(3))
    for _ in range(3):
        a = scorers[0](probs[CPU], None, states[CPU], False)
        b = scorers[1](probs[CUDA], None, states[CUDA], False)
        torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=0, msg="RandomScorer draws differently on cuda")


# ---- the search end to end on cuda -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup():
    return tiny_setup()


def check_result(res, what: str) -> None:
    """Snapshots on cuda, their FLOPs bookkeeping self-consistent and at their targets; a token stage ran."""
    assert res.snapshots, f"{what}: no snapshot"
    modes = [r["mode"] for r in res.stage_log]
    assert {"T_v", "T_l"} & set(modes), f"{what}: no token stage ran (modes {modes})"
    for ratio, (model, recipe) in res.snapshots.items():
        assert_on(model, CUDA, f"{what}: snapshot {ratio}")
        flops = comp_vlm.count_flops(model, REF)
        assert recipe.pruned_flops == flops, f"{what} {ratio}: recipe FLOPs {recipe.pruned_flops} != model {flops}"
        assert flops / recipe.dense_flops <= 1 - ratio + 1e-9, f"{what} {ratio}: keeps {flops / recipe.dense_flops}"
        assert math.isfinite(res.metrics[ratio]["r1_mean"]), f"{what} {ratio}: metrics {res.metrics[ratio]}"
    final = res.recipe
    keeps = [lay.keep_ratio for layers in final.towers.values() for lay in layers if lay.keep_ratio is not None]
    assert keeps and min(keeps) < 1.0, f"{what}: the final model prunes no tokens (keep ratios {keeps})"


def compare_devices(model: torch.nn.Module, batch: dict, what: str) -> None:
    """``model`` (on cuda) computes what a CPU copy of it computes (the copy is made first: a random scorer's
    generator state travels with it, so both draw the same noise)."""
    on_cpu = copy.deepcopy(model).to(CPU)
    with torch.no_grad():
        a = model(**moved(batch, CUDA))
        b = on_cpu(**batch)
    assert_close((a.image_embeds, a.text_embeds, a.logits_per_image), (b.image_embeds, b.text_embeds,
                                                                       b.logits_per_image), f"{what}: cuda vs CPU")


def model_inputs(batch: dict, n: int = 8) -> dict:
    """The first ``n`` texts of ``batch`` with noise images: the synthetic images' background patches would make
    near-tied token scores, which float rounding may order differently on the two devices."""
    pixels = torch.randn(batch["pixel_values"][:n].shape, generator=torch.Generator().manual_seed(1))
    return {"pixel_values": pixels, "input_ids": batch["input_ids"][:n], "attention_mask": batch["attention_mask"][:n]}


@pytest.mark.parametrize("scorer", ["attention", "random"])
def test_prune_end_to_end_on_cuda(setup, scorer, tmp_path):
    cfg, tok, loaders = setup
    task = RetrievalTask()
    ckpt = tmp_path / "ckpt"
    config = quick(ratio=0.4, snapshots=(0.2,), seed=0, token_scorer=scorer, checkpoint_dir=str(ckpt))
    res = prune(fresh(cfg).to(CUDA), task, loaders.train, loaders.val, config, test_data=loaders.test)
    what = f"prune on cuda ({scorer} scorer)"
    check_result(res, what)
    batch = model_inputs(loaders.test[0])
    for ratio, (model, _) in sorted(res.snapshots.items()):
        compare_devices(model, batch, f"{what}, snapshot {ratio}")
    # save -> load: on cuda and on the CPU (two fresh loads: their scorers start from the same state)
    out = res.save(str(tmp_path / "pruned"), tokenizer=tok)
    loaded = load_pruned(out, device="cuda")
    assert_on(loaded, CUDA, "load_pruned(device='cuda')")
    assert comp_vlm.count_flops(loaded, REF) == res.recipe.pruned_flops
    if scorer == "attention":  # deterministic sites: the loaded model computes what the search's model does
        with torch.no_grad():
            a, b = res.model(**moved(batch, CUDA)), loaded(**moved(batch, CUDA))
        assert_close((b.image_embeds, b.text_embeds), (a.image_embeds, a.text_embeds), "loaded vs pruned, cuda")
    compare_devices(loaded, batch, f"{what}, loaded")
    # the search resumed from its last checkpoint (read back on the CPU) finishes on cuda
    assert (ckpt / "state.json").is_file(), "the search wrote no checkpoint"
    state = json.loads((ckpt / "state.json").read_text())
    resumed = prune(fresh(cfg).to(CUDA), task, loaders.train, loaders.val,
                    quick(ratio=0.4, snapshots=(0.2,), seed=0, token_scorer=scorer, checkpoint_dir=str(ckpt),
                          resume=True), test_data=loaders.test)
    check_result(resumed, f"{what}, resumed at stage {state['pruner']['stage_index']}")
    assert sorted(resumed.snapshots) == sorted(res.snapshots)


def test_prune_on_cuda_counts_flops_as_the_cpu_run(setup):
    """The same seeded search on the CPU: the same dense FLOPs and targets reached (the kept units may differ, as
    float rounding differs between the devices), each run self-consistent."""
    cfg, _, loaders = setup
    config = quick(ratio=0.4, seed=0, finetune_steps=0)
    runs = {}
    for d in (CPU, CUDA):
        loaders.train.load_state_dict({"epoch": 0, "position": 0})  # the same batches in both runs
        runs[d] = prune(fresh(cfg).to(d), RetrievalTask(), loaders.train, loaders.val, config)
    for d, res in runs.items():
        for ratio, (model, recipe) in res.snapshots.items():
            assert recipe.pruned_flops == comp_vlm.count_flops(model, REF), f"{d.type} run, snapshot {ratio}"
    assert runs[CUDA].recipe.dense_flops == runs[CPU].recipe.dense_flops
    assert sorted(runs[CUDA].snapshots) == sorted(runs[CPU].snapshots), \
        f"cuda reached {sorted(runs[CUDA].snapshots)}, the CPU {sorted(runs[CPU].snapshots)}"


def test_search_state_read_back_on_the_cpu_keeps_collecting_on_cuda(setup):
    """A checkpoint reads back on the CPU: statistics of a stage in progress must go back to the model's device,
    or the next training forward adds a cuda statistic to a CPU one."""
    cfg, _, loaders = setup
    task = RetrievalTask()
    model = fresh(cfg).to(CUDA)
    pruner = Pruner(model, task, loaders.val[:1], quick(ratio=0.3))
    pruner.calibrate(cycle_batches(loaders.train))
    assert pruner.plan is not None, "the search has no stage in progress"
    batch = task.batch_to(loaders.val[0], CUDA)
    model.train()
    task.loss(model, batch).backward()  # a training forward of the stage: statistics on cuda
    meta, tensors = pruner.state_dict()
    stats = [k for k in tensors if k.startswith("stats/")]
    assert stats, "the stage collected no statistics"
    assert {tensors[k].device.type for k in stats} == {"cuda"}
    pruner.load_state_dict(json.loads(json.dumps(meta)), {k: v.cpu() for k, v in tensors.items()})
    devices = {v.device.type for v in pruner.collector.stats.values()}
    assert devices == {"cuda"}, f"statistics read back on {devices}, the model is on cuda"
    task.loss(model, batch).backward()  # adds to the read-back statistics
    pruner.step()
    assert pruner.stage_step == 1


# ---- the command line --------------------------------------------------------------------------------------------
def test_cli_prune_eval_bench_on_cuda(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["prune", "--model", "demo-clip-quick", "--ratio", "0.5", "--out", str(out), "--cache",
            str(tmp_path / "cache"), "--stage-steps", "2", "--flops-step", "0.25", "--finetune-steps", "1",
            "--calibration-batches", "1", "--device", "cuda", "--quiet"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, f"comp-vlm prune --device cuda failed:\n{captured.err[-3000:]}"
    recipe = comp_vlm.read_recipe(out)
    assert recipe.flops_kept <= 0.5 + 1e-9
    results = {}
    for device in ("cuda", "cpu"):
        path = tmp_path / f"eval-{device}.json"
        code = main(["eval", str(out), "--device", device, "--json", str(path), "--quiet"])
        captured = capsys.readouterr()
        assert code == 0, f"comp-vlm eval --device {device} failed:\n{captured.err[-3000:]}"
        results[device] = json.loads(path.read_text())
    assert results["cuda"]["flops"] == results["cpu"]["flops"] == recipe.pruned_flops
    # the same test split; a near-tie of token scores (the images' uniform background) may order one token
    # differently on the two devices: the loss to 1e-3, a recall to one query in 32 (galleries hold >= 32 pairs)
    for key, value in results["cpu"]["metrics"].items():
        tolerance = {"rel": 1e-3} if key == "loss" else {"abs": 100 / 32 + 1e-6}
        assert results["cuda"]["metrics"][key] == pytest.approx(value, **tolerance), \
            f"eval {key}: cuda {results['cuda']['metrics']}, CPU {results['cpu']['metrics']}"
    path = tmp_path / "bench.json"
    code = main(["bench", str(out), "--device", "cuda", "--batch-sizes", "1,2", "--text-lengths", "6", "--repeats",
                 "2", "--warmup", "1", "--json", str(path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, f"comp-vlm bench --device cuda failed:\n{captured.err[-3000:]}"
    bench = json.loads(path.read_text())
    assert bench["device"] == "cuda"
    for row in bench["results"]:
        for name in ("dense", "pruned"):
            ms = row[name]["latency_ms"]
            assert math.isfinite(ms) and ms > 0, f"bench {name} latency {ms}"
        assert row["pruned"]["flops"] < row["dense"]["flops"]


# ---- measured latency ----------------------------------------------------------------------------------------------
def test_interleaved_latency_on_cuda():
    dense = CASES[("clip", "CLIPModel")].make(0, "sdpa").to(CUDA)
    pruned = copy.deepcopy(dense)
    adapter = get_adapter(pruned).install()
    random_unit_masks(adapter, 0)
    all_sites(adapter, 0.5)
    adapter.slice()
    inputs = bench_inputs(pruned, 2, 8)  # CPU tensors: the timer moves them to the models' device
    times = interleaved_latency_ms([dense, pruned], inputs, repeats=3, warmup=1)
    assert len(times) == 2 and all(math.isfinite(t) and t > 0 for t in times), times
