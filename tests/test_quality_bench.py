"""Bookkeeping of the quality suite (benchmarks/quality.py): suite keys, resume and pairing, --set, the fix arms,
legacy records, the FLOPs-went-where sums and the repeat commands. Pure functions only: no model is trained."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from quality_suite import arms, identity, provenance, report, run, stats, store

import comp_vlm


@dataclasses.dataclass
class FakeConfig:
    """A PruneConfig with the engine fields the fix arms need (today's engine may not have them yet)."""

    ratio: float = 0.8
    snapshots: tuple[float, ...] = ()
    strategy: str = "comp"
    seed: int = 0
    stage_steps: int = 50
    stage_metric: bool = True
    reference: dict | None = None
    log_path: str | None = None
    progress: bool = True
    selection: str = "new-rule"
    token_plan: str = "new-plan"
    warmup_order: str = "adaptive"
    sliver_fraction: float = 0.1
    min_stage_fraction: float = 0.05
    lr_schedule: str = "cosine"
    finetune_schedule: str = "cosine"
    distill: float = 1.0


IDENTITY = {"world": "w-v2", "model": {"name": "m", "vision": {"hidden": 64}}, "task": {"name": "retrieval"},
            "bench": {"name": "m", "stage_steps": 50}}


def record(arm: str, seed: int, metric: float, suite: str | None = None, ratio: float = 0.8, **extra) -> dict:
    rec = {"strategy": arms.base_name(arm), "ratio": ratio, "seed": seed, "metric": metric, "reached": True,
           "dense_metric": 90.0, "flops_kept": 1 - ratio, "steps": 100, **extra}
    if suite is not None:
        rec |= {"suite": suite, "arm": arm}
    return rec


# ---- suite keys, resume, pairing ---------------------------------------------------------------------------------
def test_suite_key_ignores_arm_level_fields_only():
    base = arms.config_dict(FakeConfig())
    key = identity.suite_key(IDENTITY, base, "new-rule")
    same = arms.config_dict(FakeConfig(strategy="sjp", seed=7, selection="per-flop"))
    assert identity.suite_key(IDENTITY, same, "new-rule") == key
    assert identity.suite_key(IDENTITY, arms.config_dict(FakeConfig(distill=0.5)), "new-rule") != key
    wider = IDENTITY | {"model": {"name": "m", "vision": {"hidden": 96}}}
    assert identity.suite_key(wider, base, "new-rule") != key
    assert identity.suite_key(IDENTITY | {"world": "w-v3"}, base, "new-rule") != key
    assert identity.suite_key(IDENTITY, base, "per-flop") != key  # another default rule: the labels mean other things
    assert len(key) == 12 and key == identity.suite_key(dict(reversed(IDENTITY.items())), base, "new-rule")


def test_a_later_field_at_its_neutral_value_keeps_earlier_suites():
    base = arms.config_dict(FakeConfig())
    key = identity.suite_key(IDENTITY, base, "new-rule")
    assert identity.suite_key(IDENTITY, base | {"token_scorer": "attention"}, "new-rule") == key
    assert identity.suite_key(IDENTITY, base | {"token_scorer": "random"}, "new-rule") != key


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def suite_of_record(rec: dict) -> str:
    """A record's suite key from its own fields, for an arm with no options of its own and the suite's default
    selection rule (its label has no ``@``): the key the suite's invocation computed, by another path."""
    own = {k: rec[k] for k in ("world", "model", "task", "bench")}
    return identity.suite_key(own, rec["config"], rec["config"]["selection"])


def keyed_by_own_fields(rec: dict) -> bool:
    return "suite" in rec and "@" not in rec["arm"] and not arms.arm_strategy(rec["strategy"])[1]


@pytest.mark.parametrize("name", ["quality.json", "quality-emoji.json"])
def test_committed_records_reproduce_their_suite_keys(name):
    records = [r for r in json.loads((RESULTS / name).read_text()) if keyed_by_own_fields(r)]
    assert len({r["suite"] for r in records}) >= 1
    assert [r["suite"] for r in records] == [suite_of_record(r) for r in records]


def test_records_carry_the_versions_outside_the_suite_key():
    import platform

    import torch
    import transformers
    from bench_world import make_bench

    inv = identity.make_invocation(make_bench(True), [0.5, 0.8], ["distill=0.5"])
    assert inv.versions == provenance.versions()
    assert inv.versions["python"] == platform.python_version() and inv.versions["torch"] == torch.__version__
    assert inv.versions["transformers"] == transformers.__version__ and inv.versions["comp_vlm_commit"] == inv.commit
    other = dataclasses.replace(inv, versions={"torch": "0.0"})
    for arm in (*arms.MAIN, *arms.SANITY, "comp-metric", arms.CONTROL):
        config = arms.arm_config(inv.base, "comp" if arm == arms.CONTROL else arm, 3)  # as run.main runs it
        rec = inv.run_identity(arm, config)
        assert rec["versions"] == inv.versions and rec["suite"] == inv.suite
        assert other.run_identity(arm, config) == rec | {"versions": {"torch": "0.0"}}
        if keyed_by_own_fields(rec):
            assert suite_of_record(rec) == inv.suite


def test_sanity_arms_are_baselines_with_their_own_options():
    assert arms.arm_strategy("sjp-random") == ("sjp", {"token_scorer": "random"})
    assert arms.is_baseline("sjp-random") and arms.is_baseline("downsample")
    assert "downsample" not in arms.COMP_FAMILY and run.SPECIAL["downsample"] is run.run_downsample


def test_config_dict_drops_paths_and_switches():
    d = arms.config_dict(FakeConfig(snapshots=(0.5, 0.8), log_path="x.jsonl"))
    assert "log_path" not in d and "progress" not in d
    assert d["snapshots"] == [0.5, 0.8] and d["reference"] is None


def test_resume_key_distinguishes_suites_and_reads_legacy_records():
    records = [record("comp", 0, 80.0, suite="aaa"), record("comp", 1, 80.0), record("sjp@per-flop", 0, 1, "aaa")]
    done = store.done_runs(records)
    assert ("aaa", "comp", 0) in done and ("bbb", "comp", 0) not in done
    assert (arms.LEGACY, "comp", 1) in done and ("aaa", "comp", 1) not in done
    assert ("aaa", "sjp@per-flop", 0) in done and ("aaa", "sjp", 0) not in done


def test_pairing_never_mixes_suites():
    records = [record("comp", 0, 80.0, "aaa"), record("sjp", 0, 70.0, "aaa"),
               record("comp", 1, 85.0, "aaa"), record("sjp", 1, 81.0, "bbb"),  # seed 1: other suites
               record("comp", 2, 60.0), record("sjp", 2, 50.0)]  # legacy pair
    assert stats.paired(records, 0.8, "comp", "sjp") == [10.0, 10.0]  # aaa seed 0 and the legacy seed 2
    assert stats.paired([r for r in records if arms.suite_of(r) == "aaa"], 0.8, "comp", "sjp") == [10.0]
    assert stats.paired(records, 0.5, "comp", "sjp") == []


def test_by_suite_keeps_order_and_puts_old_records_in_legacy():
    records = [record("comp", 0, 1.0), record("comp", 0, 1.0, "bbb"), record("sjp", 0, 1.0)]
    groups = store.by_suite(records)
    assert list(groups) == [arms.LEGACY, "bbb"] and len(groups[arms.LEGACY]) == 2


def test_best_rule_takes_the_best_mean_per_ratio():
    records = [record("sjp", 0, 70.0, "a"), record("sjp", 1, 72.0, "a"),
               record("sjp@per-flop", 0, 75.0, "a"), record("sjp@per-flop", 1, 75.0, "a"),
               record("sjp", 0, 60.0, "a", ratio=0.5), record("sjp@per-flop", 0, 50.0, "a", ratio=0.5)]
    assert stats.best_rule(records, 0.8, "sjp") == "sjp@per-flop"
    assert stats.best_rule(records, 0.5, "sjp") == "sjp"
    assert stats.best_rule(records, 0.7, "sjp") is None


def test_baseline_table_pairs_comp_with_each_baselines_best_rule():
    records = [record(arm, seed, m + seed, "a") for arm, m in (("comp", 80.0), ("sjp", 70.0), ("sjp@per-flop", 78.0),
                                                               ("no-re", 90.0), ("comp@per-flop", 99.0))
               for seed in range(3)]
    rows = [x for x in report.baseline_section(records, [0.8], "##") if x.startswith("| 0.8")]
    assert rows == ["| 0.8 | sjp@per-flop | 79.00 | 81.00 | +2.00 ± 0.00 | 3 | CI excludes 0 |"]  # no-re: no baseline


def test_fixes_table_runs_from_old_to_comp():
    records = [record(arm, seed, m, "a") for arm, m in (("comp", 80.0), ("old+tokens", 75.0), ("old", 70.0),
                                                        ("old+selection", 72.0), ("sjp", 1.0)) for seed in range(2)]
    rows = [x for x in report.fixes_section(records, [0.8], "##") if x.startswith("| 0.8")]
    assert [x.split(" | ")[1] for x in rows] == ["old", "old+selection", "old+tokens", "comp"]
    assert "| +10.00 ± 0.00 | 2 |" in rows[-1] and report.fixes_section([records[0]], [0.8], "##") == []


def test_control_steps_are_the_median_of_the_suites_comp_runs():
    records = [record("comp", 0, 1, "a", search_steps=100), record("comp", 0, 1, "a", ratio=0.5, search_steps=100),
               record("comp", 1, 1, "a", search_steps=200), record("comp", 2, 1, "a", search_steps=300),
               record("comp", 0, 1, "b", search_steps=5000), record("sjp", 0, 1, "a", search_steps=7000)]
    assert run.control_search_steps(records, "a", 10) == 200
    assert run.control_search_steps(records, "c", 10) is None
    assert run.control_search_steps([record("comp", 0, 1, steps=150)], arms.LEGACY, 50) == 100  # legacy: steps - ft


# ---- arms ----------------------------------------------------------------------------------------------------------
def test_fix_arms_cover_every_fix_with_fields_of_the_legacy_options():
    fixed = arms.fix_arms(arms.LEGACY_OPTIONS, arms.FIXES)
    assert set(fixed) == {"old"} | {f"old+{fix}" for fix in arms.FIXES}
    for fix, fields in arms.FIXES.items():
        assert set(fields) <= set(arms.LEGACY_OPTIONS)
        options = fixed[f"old+{fix}"][1]
        assert set(options) == set(arms.LEGACY_OPTIONS)
        assert {k for k, v in options.items() if v == arms.FROM_SUITE} == set(fields)


def test_arm_config_applies_legacy_options_and_the_suite_value_of_one_fix():
    base = FakeConfig(distill=0.5)  # as if --set distill=0.5
    old = arms.arm_config(base, "old", seed=3)
    assert (old.strategy, old.seed, old.selection, old.token_plan, old.distill) == ("comp", 3, "per-flop", "legacy", 0.0)
    tokens = arms.arm_config(base, "old+tokens", seed=3)
    assert (tokens.token_plan, tokens.min_stage_fraction) == ("new-plan", 0.05)
    assert (tokens.selection, tokens.warmup_order, tokens.distill) == ("per-flop", "fixed", 0.0)
    recovery = arms.arm_config(base, "old+recovery", seed=3)
    assert (recovery.lr_schedule, recovery.distill) == ("cosine", 0.5)  # the suite's value, --set included
    assert arms.arm_config(base, "sjp", seed=1).strategy == "sjp"


def test_arm_config_names_the_fields_the_engine_lacks():
    @dataclasses.dataclass
    class Today:
        strategy: str = "comp"
        seed: int = 0
        progress: bool = True
        min_stage_fraction: float = 0.25
        distill: float = 0.0

    with pytest.raises(comp_vlm.ConfigError, match="old: PruneConfig has no field selection, token_plan") as exc:
        arms.arm_config(Today(), "old", 0)
    assert "min_stage_fraction" not in str(exc.value) and "\n" not in str(exc.value)
    assert arms.arm_config(Today(), "comp", 2).seed == 2


def test_arm_label_marks_a_selection_rule_the_arm_does_not_imply():
    assert arms.arm_label("comp", "new-rule", "new-rule") == "comp"
    assert arms.arm_label("sjp", "per-flop", "new-rule") == "sjp@per-flop"
    assert arms.arm_label("old", "per-flop", "new-rule") == "old"  # its own legacy rule
    assert arms.arm_label("old", "new-rule", "new-rule") == "old@new-rule"
    assert arms.arm_label("old+selection", "new-rule", "new-rule") == "old+selection"
    assert arms.arm_label("comp", None, None) == "comp"  # an engine without the field
    assert arms.base_name("sjp@per-flop") == "sjp" and arms.label_of({"strategy": "cycle"}) == "cycle"


# ---- --set ---------------------------------------------------------------------------------------------------------
def test_parse_overrides_types_and_errors():
    assert arms.parse_overrides(["distill=0.5", "stage_steps=20", "stage_metric=no", "selection=per-flop",
                              "reference={\"text_length\": 12}"], FakeConfig) == {
        "distill": 0.5, "stage_steps": 20, "stage_metric": False, "selection": "per-flop",
        "reference": {"text_length": 12}}
    assert arms.parse_value("0.5, 0.8", tuple[float, ...]) == (0.5, 0.8)
    assert arms.parse_value("none", dict | None) is None
    for items, message in ((["nope=1"], "no field 'nope'"), (["stage_steps=2.5"], "expected int"),
                           (["stage_metric=maybe"], "expected a bool"), (["distill"], "expected KEY=VALUE"),
                           (["seed=1"], "--seeds"), (["snapshots=0.5"], "--ratios"), (["log_path=x"], "not recorded"),
                           (["reference=[1]"], "JSON object")):
        with pytest.raises(ValueError, match=message):
            arms.parse_overrides(items, FakeConfig)


def test_parse_overrides_on_the_real_prune_config():
    assert arms.parse_overrides(["flops_step=0.1", "head_floor=2"]) == {"flops_step": 0.1, "head_floor": 2}
    with pytest.raises(ValueError, match="no field 'not_a_field'"):
        arms.parse_overrides(["not_a_field=1"])


# ---- report helpers ------------------------------------------------------------------------------------------------
def test_flops_went_where_sums_removed_by_up_to_the_snapshot():
    by = [{"heads": 0.1, "neurons": 0.2, "vision_tokens": 0.0, "text_tokens": 0.0},
          {"heads": 0.0, "neurons": 0.0, "vision_tokens": 0.3, "text_tokens": 0.05},
          {"heads": 0.05, "neurons": 0.1, "vision_tokens": 0.0, "text_tokens": 0.0},
          {"heads": 0.5, "neurons": 0.5, "vision_tokens": 0.5, "text_tokens": 0.5}]  # after the snapshot
    stage = {"stage": [1, 2, 3, 4], "modes": ["P_v", "T_v", "P_l", "P_v"], "flops_kept": [0.7, 0.35, 0.2, 0.1],
             "removed_by": by, "snapshot_stage": {"0.8": 3, "0.5": 2}}
    parts = stats.flops_went_where(stage, "0.8")
    assert parts == pytest.approx({"heads": 0.15, "neurons": 0.3, "params": 0.45, "vision_tokens": 0.3,
                                   "text_tokens": 0.05})
    assert stats.flops_went_where(stage, "0.5")["vision_tokens"] == pytest.approx(0.3)
    assert stats.flops_went_where(stage, "0.9") is None


def test_flops_went_where_attributes_old_logs_by_mode():
    stage = {"modes": ["P_v", "T_v", "T_l", "P", "P_l"], "flops_kept": [0.9, 0.6, 0.5, 0.19, 0.1]}
    parts = stats.flops_went_where(stage, "0.8")  # the snapshot follows the first stage keeping <= 0.2
    assert parts["heads"] is None and parts["neurons"] is None
    assert parts["params"] == pytest.approx(0.1 + 0.31) and parts["vision_tokens"] == pytest.approx(0.3)
    assert parts["text_tokens"] == pytest.approx(0.1)
    logged = stage | {"flops_removed_step": [0.1, 0.3, 0.1, 0.31, 0.09], "removed_by": [None] * 5,
                      "stage": [1, 2, 3, 4, 5], "snapshot_stage": {"0.8": 4}}
    assert stats.flops_went_where(logged, "0.8") == pytest.approx(parts)
    assert stats.flops_went_where({"modes": ["T_v"], "flops_kept": [0.9]}, "0.8") is None


def test_flops_section_shows_heads_and_neurons_only_where_logged():
    new = {"strategy": "comp", "suite": "a", "arm": "comp", "stage": [1], "modes": ["P_v"], "flops_kept": [0.2],
           "removed_by": [{"heads": 0.3, "neurons": 0.5, "vision_tokens": 0.0, "text_tokens": 0.0}],
           "snapshot_stage": {"0.8": 1}}
    old = {"strategy": "sjp", "modes": ["T_v"], "flops_kept": [0.2]}
    lines = report.flops_section([new, old], "##")
    assert "| comp | 1 | 0.300 | 0.500 | 0.800 | 0.000 | 0.000 | 0.800 |" in lines
    assert "| sjp | 1 | – | – | 0.000 | 0.800 | 0.000 | 0.800 |" in lines


def test_merge_floors_nests_a_legacy_file():
    assert store.merge_floors({"comp": 0.1, "sjp": 0.1}, "abc", {"comp": 0.2}) == {
        arms.LEGACY: {"comp": 0.1, "sjp": 0.1}, "abc": {"comp": 0.2}}
    assert store.merge_floors({"abc": {"comp": 0.2}}, "abc", {"sjp": 0.3}) == {"abc": {"comp": 0.2, "sjp": 0.3}}


def test_repeat_commands_group_arms_and_carry_set_and_controls():
    extra = {"overrides": {"distill": "0.5"}, "bench": {"stage_steps": 20}, "model": {"name": "bench-clip"}}
    records = [record(arm, seed, 1.0, "a", ratio=r, **extra)
               for arm in ("comp", "sjp") for seed in (0, 1) for r in (0.5, 0.8)]
    records += [record("no-re", 0, 1.0, "a", **extra), record("dense+ft", 0, 1.0, "a", ratio=0.0, **extra)]
    commands = report.repeat_commands(records, "quality-k20")
    assert commands == [
        ("python benchmarks/quality.py --stage-steps 20 --tag k20 --strategies comp,sjp --ratios 0.5,0.8 "
         "--seeds 0,1 --control-seeds 0 --set distill=0.5"),
        ("python benchmarks/quality.py --stage-steps 20 --tag k20 --strategies no-re --ratios 0.8 --seeds 0 "
         "--control-seeds '' --set distill=0.5")]
    assert report.repeat_commands([record("comp", 0, 1.0, model="smoke-clip")], "quality") == [
        "python benchmarks/quality.py --smoke --strategies comp --ratios 0.8 --seeds 0 --control-seeds ''"]



def test_repeat_commands_name_the_emoji_world_its_attempt_and_the_device():
    emoji = {"world": "emoji-world-0306efe80c8f", "model": {"name": "emoji-clip-probe"}}
    records = [record("comp", 0, 1.0, device="cuda (NVIDIA H100 80GB HBM3)", **emoji),
               record("comp", 1, 1.0, device="cpu", **emoji)]
    assert report.repeat_commands(records, "quality-emoji") == [
        ("python benchmarks/quality.py --world emoji --attempt probe --device cuda --strategies comp --ratios 0.8 "
         "--seeds 0 --control-seeds ''"),
        ("python benchmarks/quality.py --world emoji --attempt probe --strategies comp --ratios 0.8 --seeds 1 "
         "--control-seeds ''")]
    assert report.repeat_commands(records[1:], "quality-emoji-cpu")[0].startswith(
        "python benchmarks/quality.py --world emoji --attempt probe --tag emoji-cpu ")

def test_report_renders_each_suite_and_pairs_within_it(tmp_path):
    legacy = [record(arm, seed, m + seed, model="bench-clip") for arm, m in (("comp", 80.0), ("sjp", 70.0))
              for seed in range(3)]
    ident = {"world": "w", "model": {"name": "bench-clip", "dense_id": "d"}, "task": {"name": "retrieval",
             "gallery_size": 100}, "commit": "abc", "dirty": False, "overrides": {}}
    new = [record(arm, seed, m - seed, "s1", **ident) for arm, m in (("comp", 60.0), ("sjp", 65.0))
           for seed in range(3)]
    report.report(legacy + new, [], tmp_path, "quality")
    text = (tmp_path / "quality.md").read_text()
    assert "## Suite `legacy`" in text and "## Suite `s1`" in text
    assert "| 0.8 | sjp | 71.00 ± " in text and "+10.00 ± 0.00" in text  # legacy: comp − sjp = +10 per seed
    assert "| 0.8 | sjp | 64.00 ± " in text and "-5.00 ± 0.00" in text  # s1: −5 per seed, never mixed
    assert (tmp_path / "quality-legacy.png").is_file() and (tmp_path / "quality-s1.png").is_file()


# ---- provenance ----------------------------------------------------------------------------------------------------
def test_git_state_flags_changed_code_but_not_results(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    for name in ("comp_vlm/search/pruner.py", "benchmarks/results/quality.json", "README.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("v1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    head, dirty = provenance.git_state(tmp_path)
    assert len(head) == 40 and dirty is False
    (tmp_path / "benchmarks/results/quality.json").write_text("v2\n")
    (tmp_path / "README.md").write_text("v2\n")
    (tmp_path / "comp_vlm/new.py").write_text("untracked\n")
    assert provenance.git_state(tmp_path) == (head, False)
    (tmp_path / "comp_vlm/search/pruner.py").write_text("v2\n")
    assert provenance.git_state(tmp_path) == (head, True)
    assert provenance.git_state(tmp_path.parent / "not-a-repo") == (None, None)


def test_git_state_takes_the_commit_a_copier_names_over_git(tmp_path, monkeypatch):
    monkeypatch.delenv("COMP_VLM_COMMIT", raising=False)
    assert provenance.git_state(tmp_path) == (None, None)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.setenv("COMP_VLM_COMMIT", "abc123")
    assert provenance.git_state(tmp_path) == ("abc123", None)  # even inside a repository: its metadata may be stale


# ---- claims: suite processes side by side split the work -------------------------------------------------------------
def test_a_claim_is_held_while_the_run_runs_and_released_after(tmp_path):
    with store.claimed(tmp_path, "s1", "comp", 3) as mine:
        assert mine and (tmp_path / "s1-comp-3").is_file()
        with store.claimed(tmp_path, "s1", "comp", 3) as again:  # this very process is alive: held
            assert not again
        with store.claimed(tmp_path, "s1", "comp", 4) as other_seed:
            assert other_seed
    assert not list(tmp_path.iterdir())


def test_a_claim_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError), store.claimed(tmp_path, "s1", "sjp", 0) as mine:
        assert mine
        raise RuntimeError("run crashed")
    assert not (tmp_path / "s1-sjp-0").exists()


def test_a_dead_processs_claim_is_taken_over_and_another_hosts_respected(tmp_path):
    import socket

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "s1-comp-0").write_text(f"{socket.gethostname()} {gone.pid}")
    with store.claimed(tmp_path, "s1", "comp", 0) as mine:
        assert mine
    (tmp_path / "s1-comp-1").write_text(f"{socket.gethostname()}-elsewhere {gone.pid}")
    with store.claimed(tmp_path, "s1", "comp", 1) as mine:
        assert not mine
    assert (tmp_path / "s1-comp-1").is_file()  # not ours to remove


def test_emoji_bench_takes_the_first_passed_calibration(tmp_path):
    import emoji_bench
    import emoji_world_checks as checks

    path = tmp_path / "checks.json"
    with pytest.raises(emoji_bench.CalibrationMissing, match="no passed calibration"):
        emoji_bench.calibrated_attempt(path, None)
    first, second = checks.ATTEMPTS[0], checks.ATTEMPTS[1]
    path.write_text(json.dumps({"attempts": [
        {"name": first.name, "passed": False, "attempt": dataclasses.asdict(first)},
        {"name": second.name, "passed": True, "attempt": dataclasses.asdict(second)}]}))
    assert emoji_bench.calibrated_attempt(path, None) == second
    assert emoji_bench.calibrated_attempt(path, first.name) == first  # named: taken even if it failed
    with pytest.raises(emoji_bench.CalibrationMissing, match="no calibration attempt 'nope'"):
        emoji_bench.calibrated_attempt(path, "nope")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the error without a GPU")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="--device cuda was given but torch sees no GPU"):
        run.main(["--device", "cuda", "--smoke", "--out", str(tmp_path)])


# ---- --model and --task --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--task", "vqa"], "--task vqa: the quality suite runs retrieval only"),
    (["--model", "bench-clip-large"], "--model bench-clip-large: the synthetic world's model is bench-clip"),
    (["--world", "emoji", "--model", "bench-clip"], "--model bench-clip: the emoji world's models are emoji-clip-"),
    (["--world", "emoji", "--model", "emoji-clip-probe", "--attempt", "concepts-800"],
     "--model emoji-clip-probe and --attempt concepts-800 name different models"),
    (["--world", "emoji", "--model", "emoji-clip-nope"], "no calibration attempt 'nope'"),
])
def test_model_and_task_other_than_the_worlds_are_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message) as exc:
        run.main([*args, "--smoke", "--out", str(tmp_path)])
    assert "\n" not in str(exc.value)
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_model_and_task_stating_the_defaults_keep_the_suite():
    def suite(*args: str) -> str:
        return identity.make_invocation(run.suite_bench(run.arguments([*args, "--smoke"])), [0.5, 0.8], []).suite

    assert suite("--model", "bench-clip", "--task", "retrieval") == suite("--model", "smoke-clip") == suite()
    assert run.model_attempt("emoji", "emoji-clip-probe", None, smoke=True) == "probe"
    assert run.model_attempt("emoji", "emoji-clip-probe", "probe", smoke=False) == "probe"
    assert run.model_attempt("emoji", "emoji-clip-smoke", None, smoke=True) == "smoke"
    assert run.model_attempt("emoji", None, "probe", smoke=False) == "probe"
