"""The adapter contract, for every registered adapter family (method.md; issue 12): a model driven through the
protocol alone (unit groups, unit masks, token sites, slicing, recipes) must satisfy

- keep ratio 1 and no masks       == the unmodified model;
- hard-masked                     == physically sliced;
- the FLOPs model                 == torch's FlopCounterMode on the sliced model, token sites included;
- save -> load                    == the saved model;
- a padded batch                  == each sample alone (token sites on);
- gradient checkpointing          == the same gradients without it.
"""

from __future__ import annotations

import copy

import pytest
import torch
from families import CASES, Case, all_sites, call, case_id, random_unit_masks, registered
from tolerances import KERNEL_ATOL
from torch.utils.flop_counter import FlopCounterMode

from comp_vlm import AdapterOptions, get_adapter, load_pruned, save_pruned
from comp_vlm.adapters.base import _REGISTRY

ATOL = 2e-5
KEYS = sorted(CASES)


def close(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], atol: float = ATOL) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert torch.allclose(x, y, atol=atol), (x - y).abs().max().item()




@pytest.fixture(params=KEYS, ids=case_id)
def case(request) -> Case:
    return CASES[request.param]


def registered_model_classes() -> set[tuple[str, str]]:
    """(family, model class name) of every registered adapter class."""
    return {(cls.family, mc.__name__) for cls in _REGISTRY for mc in cls.model_classes}


def test_every_registered_model_class_has_a_case():
    missing = registered_model_classes() - set(CASES)
    assert not missing, f"add contract cases to tests/contract/families.py for {sorted(missing)}"


def test_a_second_model_class_of_a_family_needs_its_own_case():
    """A family with a case for one class still needs one for each further class it registers."""
    from transformers import CLIPModel

    from comp_vlm.adapters.clip import CLIPAdapter

    other_model = type("OtherCLIPModel", (CLIPModel,), {})
    other_adapter = type("OtherCLIPAdapter", (CLIPAdapter,), {"model_classes": (other_model,)})
    with registered(other_adapter):
        assert registered_model_classes() - set(CASES) == {("clip", "OtherCLIPModel")}
    assert registered_model_classes() <= set(CASES)


def test_each_case_builds_its_model_class():
    for (family, model_class), case in CASES.items():
        model = case.make(0, "eager")
        assert (get_adapter(model).family, type(model).__name__) == (family, model_class)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_unmodified(case, attn):
    model = case.make(0, attn)
    batch = (case.keep_all_batch or case.batch)()
    ref = call(case, model, batch)
    adapter = get_adapter(model).install(AdapterOptions(dead_compute=False))
    all_sites(adapter, 1.0)
    close(call(case, model, batch), ref)


@pytest.mark.parametrize("keep", [1.0, 0.5])
def test_hard_masked_equals_sliced(case, keep):
    model = case.make(1, "eager")
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 1)
    all_sites(adapter, keep)
    batch = case.batch()
    masked = call(case, model, batch)
    params = sum(p.numel() for p in model.parameters())
    adapter.slice()
    assert sum(p.numel() for p in model.parameters()) < params
    close(call(case, model, batch), masked)


@pytest.mark.parametrize("tokens", [False, True])
def test_flops_model_equals_flop_counter(case, tokens):
    model = case.make(2, "eager")
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 2)
    if tokens:
        all_sites(adapter, 0.6)
    adapter.slice()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        case.features(model, case.at_reference(model, case.reference))
    assert adapter.count_flops(case.reference) == counter.get_total_flops()


def test_save_load_round_trip(case, tmp_path):
    model = case.make(3, "eager")
    adapter = get_adapter(model).install()
    random_unit_masks(adapter, 3)
    all_sites(adapter, 0.5)
    adapter.slice()
    batch = case.batch()
    ref = call(case, model, batch)
    save_pruned(model, tmp_path / "pruned")
    same_kernel = load_pruned(tmp_path / "pruned", attn_implementation="eager").eval()
    close(call(case, same_kernel, batch), ref, atol=0.0)  # the attention it was saved under: bit for bit
    loaded = load_pruned(tmp_path / "pruned").eval()  # the default attention: another kernel (tests/tolerances.py)
    close(call(case, loaded, batch), ref, atol=KERNEL_ATOL)
    assert get_adapter(loaded).recipe().to_dict()["towers"] == adapter.recipe().to_dict()["towers"]


@pytest.mark.parametrize("keep", [0.5, 0.2])
def test_padded_batch_equals_each_sample_alone(case, keep):
    model = case.make(4, "eager")
    adapter = get_adapter(model).install()
    all_sites(adapter, keep)
    batch = case.batch()
    together = call(case, model, batch)
    for i in range(len(together[0])):
        alone = call(case, model, case.sample(batch, i))
        close(tuple(t[i:i + 1] for t in together), alone)


def test_gradient_checkpointing_gives_the_same_gradients(case):
    grads = []
    for checkpointing in (False, True):
        model = case.make(5, "eager")
        adapter = get_adapter(model).install()
        all_sites(adapter, 0.5)
        random_unit_masks(adapter, 5)
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model.train()
        case.loss(model, case.batch()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5), name


def test_deepcopy_keeps_the_contract(case):
    model = case.make(6, "eager")
    adapter = get_adapter(model).install()
    all_sites(adapter, 0.5)
    batch = case.batch()
    ref = call(case, model, batch)
    clone = copy.deepcopy(model)
    get_adapter(model).uninstall()
    close(call(case, clone, batch), ref)
