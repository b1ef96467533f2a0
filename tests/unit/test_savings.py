"""The saving computations behind the benchmarks, on hand-made curves: one rule for the compute to reach a
loss, the KI and growth savings built on it, and the goal checks that are undecided without their methods."""

import math

import pytest

from ray_lifelong.savings import (
    cost_to_reach,
    saved_against,
    saved_fraction,
    saved_to_reach,
    savings,
    target_sensitivity,
)


def curve(*points, start=(0, 0.0)):
    """(valid_loss, ...) at steps 100, 200, ... after ``start``; 1 TFLOP per 100 steps."""
    step0, flops0 = start
    return [
        {"step": step0 + 100 * i, "flops": flops0 + 1e12 * i, "valid_loss": loss}
        for i, loss in enumerate(points)
    ]


# ---------------------------------------------------------------- cost_to_reach: the one rule


def test_interpolates_between_the_evaluation_above_and_the_first_at_or_below():
    c = curve(8.0, 6.0, 5.0)
    assert cost_to_reach(c, 5.5, "step") == pytest.approx(150.0)
    assert cost_to_reach(c, 5.5, "flops") == pytest.approx(1.5e12)
    assert cost_to_reach(c, 6.0, "step") == pytest.approx(100.0)  # exactly on an evaluation
    assert cost_to_reach(c, 5.5) == cost_to_reach(c, 5.5, "flops")  # FLOPs by default


def test_a_first_point_already_at_the_target_costs_its_own_step():
    # a curve with an evaluation before training costs its start (0, or the compute already spent) ...
    assert cost_to_reach(curve(5.0, 4.0), 5.0, "step") == 0.0
    grown = curve(5.0, 4.0, start=(1000, 11e12))
    assert cost_to_reach(grown, 5.2, "flops") == 11e12
    # ... and a curve whose first evaluation comes after training its first evaluation's cost: no
    # interpolation
    # towards an origin that was never evaluated (ray-lifelong ki's curves start at step eval_every)
    late = [{"step": 100, "flops": 5e12, "valid_loss": 6.0}, {"step": 200, "flops": 1e13, "valid_loss": 5.0}]
    assert cost_to_reach(late, 6.5, "step") == 100.0
    assert cost_to_reach(late, 6.5, "flops") == 5e12
    # even when the second evaluation is above the target again
    assert cost_to_reach(curve(5.0, 5.5, 4.0), 5.2, "step") == 0.0


def test_a_non_monotone_curve_counts_its_first_crossing():
    # noisy validation: below the target at step 300, above again at 400, below at 500
    c = curve(8.0, 7.0, 6.5, 5.8, 6.2, 5.7)
    assert cost_to_reach(c, 6.0, "step") == pytest.approx(200 + 100 * (6.5 - 6.0) / (6.5 - 5.8))
    # the rise after the crossing does not count as "not reached"
    assert cost_to_reach(c, 5.8, "step") == pytest.approx(300.0)


def test_a_curve_that_never_reaches_the_target_costs_none():
    assert cost_to_reach(curve(8.0, 7.0, 6.0), 5.9, "step") is None
    assert cost_to_reach([], 5.0) is None
    assert cost_to_reach(curve(8.0, math.nan, 6.0), 5.0) is None


def test_bad_key_or_target_is_refused():
    with pytest.raises(ValueError, match="key"):
        cost_to_reach(curve(8.0), 5.0, "tokens")
    with pytest.raises(ValueError, match="NaN"):
        cost_to_reach(curve(8.0), math.nan)


def test_the_benchmarks_use_this_one_rule():
    import bench.common
    import bench.growth
    import bench.ki
    import bench.ki_sweep

    assert not hasattr(bench.common, "cost_to_reach")
    assert bench.ki.cost_to_reach is cost_to_reach
    assert bench.growth.cost_to_reach is cost_to_reach
    assert bench.ki_sweep.cost_to_reach is cost_to_reach


# ---------------------------------------------------------------- savings


def test_saved_fraction_and_its_none_cases():
    assert saved_fraction(25.0, 100.0) == pytest.approx(0.75)
    assert saved_fraction(None, 100.0) is None
    assert saved_fraction(25.0, None) is None
    assert saved_fraction(25.0, 0.0) is None
    assert saved_fraction(120.0, 100.0) == pytest.approx(-0.2)


def test_ki_savings_step_and_flop_matched_with_the_teacher_charged():
    base = curve(8.0, 7.0, 6.0, 5.5, 5.0)  # reaches its final 5.0 at step 400, 4 TFLOPs
    # KI: same steps, 10% more FLOPs per step (teacher forward), reaches 5.0 at step 200
    ki = [{**p, "flops": 1.1 * p["flops"]} for p in curve(8.0, 6.0, 5.0, 4.8, 4.5)]
    s = savings(base, ki)
    assert s["target_loss"] == 5.0
    assert s["saved_step_matched"] == pytest.approx(1 - 200 / 400) and s["reached_step_matched"]
    assert s["saved_flop_matched"] == pytest.approx(1 - 2.2 / 4.0) and s["reached_flop_matched"]


def test_ki_savings_that_never_reach_the_target_are_a_bound():
    base = curve(8.0, 6.0, 5.0)
    ki = curve(8.0, 7.0, 6.0)
    s = savings(base, ki)
    assert not s["reached_step_matched"] and s["saved_step_matched"] == pytest.approx(0.0)  # < 1 - 200 / 200
    # a target the baseline never reaches: no saving at all
    s = savings(base, curve(8.0, 4.0), target=4.5)
    assert s["saved_step_matched"] is None and s["reached_step_matched"]


def test_a_stronger_teacher_alone_saves_more_than_ki():
    """The KI benchmark's caveat: a teacher that ends better than the baseline reaches it on its own."""
    from bench.ki import teacher_context

    base = curve(8.0, 7.0, 6.0, 5.5, 5.0)  # 1 TFLOP per 100 steps
    teacher = [{**p, "flops": 0.25 * p["flops"]} for p in curve(8.0, 6.5, 5.5, 4.9, 4.8, 4.7)]  # 4x cheaper
    ki = curve(8.0, 6.5, 5.5, 5.0, 4.9)
    t = teacher_context(teacher, base, ki)
    assert t["teacher_better_than_baseline"]
    assert t["teacher_alone_saved_flops"] == pytest.approx(1 - 0.25 * (200 + 100 * 0.5 / 0.6) / 400)
    assert t["teacher_alone_saved_flops"] > savings(base, ki)["saved_flop_matched"]
    moved = t["saved_steps_target_moved"]
    assert moved["-0.02"] is None  # the baseline never gets below its own final loss
    assert moved["+0.02"] == pytest.approx(saved_to_reach(ki, base, 5.02, "step"))


def test_target_sensitivity_moves_a_saving_with_the_target():
    base = curve(8.0, 7.0, 6.0, 5.1, 5.0)
    ki = curve(8.0, 6.0, 5.05, 5.0, 4.9)
    s = target_sensitivity(base, ki, deltas=(0.0, 0.1))
    assert s[0.0] == pytest.approx(1 - 300 / 400)
    # the baseline reaches 5.1 at step 300, KI between steps 100 (6.0) and 200 (5.05)
    assert s[0.1] == pytest.approx(1 - (100 + 100 * (6.0 - 5.1) / (6.0 - 5.05)) / 300)


# ---------------------------------------------------------------- growth's saved fraction


def growth_curves():
    """The small model dips below the scratch model's final loss, then ends just above it (as in
    growth.json)."""
    small = curve(8.3, 6.5, 6.0, 5.78, 5.80)  # 1 TFLOP per 100 steps: at or below 5.79 between 3 and 4 TFLOPs
    grown = curve(5.85, 5.7, 5.6, start=(400, 4e12))  # 2 TFLOPs per 100 steps below
    grown = [{**p, "flops": 4e12 + 2 * (p["flops"] - 4e12)} for p in grown]
    scratch = [{**p, "flops": 2 * p["flops"]} for p in curve(8.3, 7.0, 6.4, 6.0, 5.9, 5.85, 5.79)]
    return {"small": small, "grown_carry": grown, "scratch": scratch}


def test_growth_saved_fraction_includes_the_small_model_alone():
    runs = growth_curves()
    saved = saved_against(runs, "scratch")
    c_scratch = 2e12 * (5 + (5.85 - 5.79) / (5.85 - 5.79))  # its own final point: 12 TFLOPs
    assert cost_to_reach(runs["scratch"], 5.79) == pytest.approx(c_scratch)
    c_grown = 4e12 + 2e12 * (5.85 - 5.79) / (5.85 - 5.7)
    assert saved["grown_carry"] == pytest.approx(1 - c_grown / c_scratch)
    # the small model reaches the target on its own (its final point is above it again) and saves more
    c_small = 2e12 + 1e12 * (6.0 - 5.79) / (6.0 - 5.78)
    assert saved["small"] == pytest.approx(1 - c_small / c_scratch)
    assert saved["small"] > saved["grown_carry"]
    assert "scratch" not in saved


def test_growth_report_says_the_small_model_alone_saves_more():
    from bench.growth import training_lines

    runs = growth_curves()
    comp = {"curves": runs, "target_loss": runs["scratch"][-1]["valid_loss"], "setup": "hand-made"}
    text = "\n".join(training_lines(comp))
    assert "Goal: at least 40%" in text and "**met** by the numbers" in text
    assert "The small model alone reaches the target" in text and "more than growth" in text
    assert "above the target" in text  # its final point, though it got there earlier
    # a small model that never gets there, and a growth that misses the goal
    runs["small"] = curve(8.3, 7.0, 6.5)
    runs["grown_carry"] = [{**p, "flops": p["flops"] * 3} for p in runs["grown_carry"]]
    text = "\n".join(training_lines(comp))
    assert "The small model alone never reaches the target." in text and "**missed**" in text


# ---------------------------------------------------------------- goal checks


def stream_result(ap, ap_plus, flops):
    return {"AP": [ap], "AP_plus": [ap_plus], "flops": [flops]}


def test_elle_stream_goals_are_undecided_unless_every_compared_method_ran():
    from bench.elle_stream import AP_RIVALS, goals

    elle = stream_result(250, -100, 30)
    # the old check passed "lowest AP" with ELLE and one ablation present: now undecided
    partial = goals({"elle": elle, "elle_no_frw": stream_result(300, -90, 28)})
    assert partial["elle_lowest_final_AP"] is None and partial["elle_AP_plus_below_naive_and_er"] is None
    # every baseline but one ran, one of them far below ELLE: still undecided
    some = {m: stream_result(140, -130, 30) for m in AP_RIVALS[:-1]}
    assert goals({"elle": elle, **some})["elle_lowest_final_AP"] is None
    everything = {m: stream_result(260, -50, 30) for m in AP_RIVALS}
    assert goals({"elle": elle, **everything})["elle_lowest_final_AP"] is True
    everything["logit_kd"] = stream_result(140, -130, 30)
    assert goals({"elle": elle, **everything})["elle_lowest_final_AP"] is False
    # joint is the upper reference and the ablations are ELLE's own variants: neither decides the goal
    assert (
        goals(
            {
                "elle": elle,
                **{m: stream_result(260, -50, 30) for m in AP_RIVALS},
                "joint": stream_result(90, -200, 30),
                "elle_no_prompts": stream_result(240, -90, 30),
            }
        )["elle_lowest_final_AP"]
        is True
    )
    assert goals({m: stream_result(260, -50, 30) for m in AP_RIVALS})["elle_lowest_final_AP"] is None


def test_elle_stream_goal_lines_say_met_missed_or_undecided():
    from bench.elle_stream import goal_lines

    lines = goal_lines({"elle": stream_result(250, -100, 30), "scratch_large": stream_result(240, -40, 45)})
    assert "- elle_lowest_final_AP: undecided (naive, er, logit_kd, elle_no_growth did not run)" in lines
    assert "- elle_reaches_scratch_large_AP_within_60pct_flops: missed" in lines


def finetuned(per_seed: list[float]) -> dict:
    """One task whose per-seed test scores are ``per_seed``; the task average is their mean."""
    mean = sum(per_seed) / len(per_seed)
    return {
        "t": {"test": mean, "std": 0.0, "seeds": {str(i): {"test": x} for i, x in enumerate(per_seed)}},
        "average": mean,
        "prompts": False,
    }


def test_downstream_goals_need_every_baseline_and_a_margin_beyond_the_seed_spread():
    from bench.downstream import RIVALS, goals, spread

    assert spread(finetuned([0.40, 0.41, 0.42])) == pytest.approx(0.01)
    far = {m: finetuned([0.30, 0.31, 0.32]) for m in RIVALS}
    elle = finetuned([0.40, 0.41, 0.42])
    assert goals({"elle": elle, **far})["elle_best_average"] is True
    # a missing baseline: undecided, even with ELLE ahead of all that ran
    assert (
        goals({"elle": elle, **{m: v for m, v in far.items() if m != "joint"}})["elle_best_average"] is None
    )
    # ELLE ahead of one baseline by less than the seed spread: undecided; behind one by more: missed
    assert goals({"elle": elle, **far, "er": finetuned([0.40, 0.405, 0.41])})["elle_best_average"] is None
    assert goals({"elle": elle, **far, "er": finetuned([0.50, 0.51, 0.52])})["elle_best_average"] is False
    # the better of two ELLE variants does not count for ELLE
    g = goals(
        {
            "elle": finetuned([0.30, 0.31, 0.32]),
            "elle_prompts_off": finetuned([0.60, 0.61, 0.62]),
            **{m: finetuned([0.50, 0.51, 0.52]) for m in RIVALS},
        }
    )
    assert g["elle_best_average"] is False and g["prompts_help_on_average"] is False
    assert goals({"naive": far["naive"]}) == {"elle_best_average": None, "prompts_help_on_average": None}
