"""Sweep config: search-space validation, dotted-path values, the Tune domains they map to (no cluster)."""

from __future__ import annotations

import os
import re

import pytest

from ray_lifelong.config import ConfigError, load_config, with_values
from ray_lifelong.config.schema import SearchDim
from ray_lifelong.sweep import absolute_paths, check_space, dimension, max_reports, trials_in_sweep
from tests.conftest import REPO

TUNE_KI = REPO / "configs/tune_ki.yaml"


def test_tune_ki_config_loads_and_its_space_is_valid():
    cfg = load_config(TUNE_KI)
    check_space(cfg)
    assert cfg.tune.base == "ki" and cfg.tune.scheduler == "asha"
    assert {"ki.inherit.schedule", "ki.inherit.alpha0", "ki.inherit.temperature", "ki.inherit.top_k",
            "ki.inherit.steps", "train.lr"} <= set(cfg.tune.space)
    assert max_reports(cfg) == 4  # 100 steps, a validation every 25


def test_with_values_sets_dotted_fields_including_list_items():
    cfg = load_config(TUNE_KI)
    c = with_values(cfg, {"ki.inherit.alpha0": 0.3, "data.domains.0.steps": 7, "ki.inherit.top_k": None})
    assert c.ki.inherit.alpha0 == 0.3 and c.data.domains[0].steps == 7 and c.ki.inherit.top_k is None
    assert cfg.ki.inherit.alpha0 == 1.0  # the original is untouched


@pytest.mark.parametrize("values, words", [
    ({"ki.inherit.alpha00": 0.5}, ["ki.inherit.alpha00", "alpha0"]),      # typo: names the key, suggests
    ({"ki.inherit.steps": "many"}, ["ki.inherit.steps", "many"]),          # wrong type
    ({"ki.inherit.alpha0": 0.5, "train.steps": 0}, ["train.steps", "positive"]),  # cross-field validation
])
def test_with_values_rejects_unknown_or_ill_typed_fields(values, words):
    with pytest.raises(ConfigError) as e:
        with_values(load_config(TUNE_KI), values)
    assert all(w in str(e.value) for w in words)


def test_check_space_rejects_a_path_or_value_the_config_does_not_accept():
    cfg = load_config(TUNE_KI, ["tune.space={ki.inherit.shedule: {choice: [linear]}}"])
    with pytest.raises(ConfigError, match="shedule"):
        check_space(cfg)
    cfg = load_config(TUNE_KI, ["tune.space={ki.inherit.alpha0: {uniform: [0.5, 1.5]}}"])
    with pytest.raises(ConfigError, match="alpha0"):  # the high end of the range is out of [0, 1]
        check_space(cfg)
    cfg = load_config(TUNE_KI, ["tune.space={ki.inherit.schedule: {choice: [linear, warp]}}"])
    with pytest.raises(ConfigError, match="schedule"):
        check_space(cfg)
    cfg = load_config(TUNE_KI)
    cfg.tune.space = {}
    with pytest.raises(ConfigError, match="empty"):
        check_space(cfg)


@pytest.mark.parametrize("space, words", [
    ("{train.weight_decay: {uniform: [0.1, 0.01]}}", ["train.weight_decay", "low < high"]),
    ("{train.weight_decay: {loguniform: [0, 0.01]}}", ["loguniform", "low > 0"]),
    ("{train.weight_decay: {uniform: [0.1, 0.2], choice: [0.1]}}", ["exactly one"]),
    ("{train.weight_decay: {}}", ["exactly one"]),
])
def test_bad_dimensions_are_refused_at_load(space, words):
    with pytest.raises(ConfigError) as e:
        load_config(TUNE_KI, [f"tune.space={space}"])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_sweep_runs_num_samples_trials_of_each_grid_combination():
    assert trials_in_sweep(load_config(TUNE_KI, ["tune.num_samples=3"])) == 3  # no grid dimension
    grid = ("tune.space={train.weight_decay: {grid: [0.1, 0.2]}, train.lr: {grid: [1.0e-3, 2.0e-3, 3.0e-3]}, "
            "ki.inherit.alpha0: {uniform: [0.2, 0.8]}}")
    assert trials_in_sweep(load_config(TUNE_KI, [grid, "tune.num_samples=2"])) == 2 * 2 * 3


def test_grid_needs_random_search_and_unknown_scheduler_is_refused():
    with pytest.raises(ConfigError, match="grid"):
        load_config(TUNE_KI, ["tune.space={train.weight_decay: {grid: [0.1, 0.2]}}", "tune.search=optuna"])
    with pytest.raises(ConfigError, match="tune.scheduler"):
        load_config(TUNE_KI, ["tune.scheduler=hyperband"])
    with pytest.raises(ConfigError, match="tune.sample"):  # unknown key in the tune section
        load_config(TUNE_KI, ["tune.sample=3"])


def test_dimensions_map_to_tune_domains_that_sample_inside_their_bounds():
    from ray.tune.search.sample import Categorical, Float, Integer

    assert isinstance(dimension(SearchDim(choice=["linear", "cosine"])), Categorical)
    assert dimension(SearchDim(grid=[1, 2])) == {"grid_search": [1, 2]}
    lu = dimension(SearchDim(loguniform=[1e-4, 1e-2]))
    assert isinstance(lu, Float) and all(1e-4 <= lu.sample() <= 1e-2 for _ in range(50))
    ri = dimension(SearchDim(randint=[10, 12]))
    assert isinstance(ri, Integer) and {ri.sample() for _ in range(50)} <= {10, 11}
    u = dimension(SearchDim(uniform=[0.2, 0.4]))
    assert all(0.2 <= u.sample() <= 0.4 for _ in range(50))


def test_absolute_paths_keeps_uris_and_makes_local_paths_absolute():
    cfg = load_config(
        TUNE_KI, ["data.domains=[{name: a, train: [data/x/*.gz, 's3://b/k/*.gz'], valid: [v.gz]}]"]
    )
    c = absolute_paths(cfg)
    assert c.data.domains[0].train == [os.path.abspath("data/x/*.gz"), "s3://b/k/*.gz"]
    assert (
        os.path.isabs(c.output_dir)
        and os.path.isabs(c.demo.dir)
        and os.path.isabs(c.data.domains[0].valid[0])
    )
    assert cfg.data.domains[0].train[0] == "data/x/*.gz"


def test_pbt_segments_cover_the_stage_and_end_at_its_last_step():
    from ray_lifelong.sweep import segment_ends

    assert segment_ends(8, 4) == [4, 8]
    assert segment_ends(10, 4) == [4, 8, 10]
    assert segment_ends(3, 5) == [3]
    for steps in range(1, 40):
        for k in range(1, 12):
            ends = segment_ends(steps, k)
            assert (
                ends[-1] == steps
                and ends == sorted(set(ends))
                and all(b - a <= k for a, b in zip([0] + ends, ends))
            )


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["tune.space={model.hidden_size: {choice: [64, 128]}}"],
            r"pbt cannot change \['model.hidden_size'\]",
        ),
        (["tune.space={train.lr: {grid: [1.0e-3, 2.0e-3]}}"], "use choice, not grid"),
        (["tune.search=optuna"], "pbt draws its own values"),
    ],
)
def test_pbt_refuses_what_a_running_stage_cannot_change(overrides, words):
    with pytest.raises(ConfigError, match=words):
        load_config(TUNE_KI, ["tune.scheduler=pbt", *overrides])


def test_pbt_needs_a_one_domain_config():
    with pytest.raises(ConfigError, match="pbt clones trials between segments of one stage"):
        load_config(REPO / "configs/demo.yaml", ["tune.scheduler=pbt"])


def test_trial_ids_come_from_the_trial_directory():
    from ray_lifelong.sweep import _trial_id

    assert (
        _trial_id("/x/tune/_pbt_trial_11cb3_00001_1_ki_inherit_alpha0=0.7056,train_lr=0.0000_2026-11-26")
        == "11cb3_00001"
    )
    assert _trial_id("/x/tune/_trial_a0b1c_00012_12_train_lr=0.001_2026") == "a0b1c_00012"
    assert _trial_id("/x/tune/other") is None


def test_a_trial_counts_its_driver_workers_and_data_pipeline():
    # driver 0.25, one worker of 0.25, a read task 0.25 and one tokenizer actor 0.25
    cfg = load_config(TUNE_KI)
    from ray_lifelong.sweep import trial_demand, trials_that_fit

    d = trial_demand(cfg)
    assert d == {"driver": 0.25, "workers": 0.25, "data": 0.5, "gpus": 0.0}
    assert trials_that_fit(d, cpus=2, gpus=0) == 2 and trials_that_fit(d, cpus=1.9, gpus=0) == 1
    packed = trial_demand(with_values(cfg, {"data.pretokenize": True, "data.tokenize_actors": 3}))
    assert packed["data"] == 0.25  # packed rows: read tasks, no tokenizer
    gpu = with_values(
        cfg,
        {
            "scaling.use_gpu": True,
            "scaling.num_workers": 2,
            "scaling.gpus_per_worker": 0.5,
            "train.micro_batch_size": 8,
        },
    )
    assert trials_that_fit(trial_demand(gpu), cpus=64, gpus=3) == 3  # one GPU per trial: the GPUs decide


def test_the_concurrency_is_lowered_to_what_the_cluster_holds_and_says_so(capsys):
    from ray_lifelong.sweep import concurrency

    cfg = with_values(load_config(TUNE_KI), {"tune.max_concurrent_trials": 4, "scaling.cpus_per_worker": 0.5})
    assert concurrency(cfg, cpus=16, gpus=0) == 4 and capsys.readouterr().out == ""
    assert concurrency(cfg, cpus=2, gpus=0) == 1  # 1.25 CPUs a trial
    line = capsys.readouterr().out.strip()
    assert (
        "running 1 trials at a time" in line and "1.25 CPUs" in line and "2 CPUs" in line and "\n" not in line
    )
    with pytest.raises(ConfigError, match="one trial needs 1.25 CPUs.*has 1 CPUs"):
        concurrency(cfg, cpus=1, gpus=0)
    assert concurrency(with_values(cfg, {"tune.fit_to_cluster": False}), cpus=1, gpus=0) == 4  # autoscaling
    pbt = load_config(
        TUNE_KI,
        [
            "tune.scheduler=pbt",
            "tune.num_samples=2",
            "tune.max_concurrent_trials=2",
            "scaling.cpus_per_worker=0.5",
            "tune.space={train.lr: {choice: [1.0e-3, 2.0e-3]}}",
        ],
    )
    with pytest.raises(ConfigError, match="pbt runs its 2 trials together"):
        concurrency(pbt, cpus=2, gpus=0)


def test_pbt_must_run_all_its_trials_at_once():
    with pytest.raises(ConfigError, match="tune.max_concurrent_trials"):
        load_config(
            TUNE_KI,
            [
                "tune.scheduler=pbt",
                "tune.num_samples=3",
                "tune.max_concurrent_trials=2",
                "tune.space={train.lr: {choice: [1.0e-3, 2.0e-3]}}",
            ],
        )


@pytest.mark.ray
def test_never_more_trials_run_than_the_limit(ray_4cpus, tmp_path, capsys):
    """Four samples, a limit of two, on a cluster with room for four: the sweep's own Tuner starts at most two
    (Tune ignored max_concurrent_trials for the seeded variant generator and started all four)."""
    import time

    from ray import tune

    from ray_lifelong.sweep import new_tuner

    cfg = with_values(
        load_config(TUNE_KI),
        {"tune.num_samples": 4, "tune.max_concurrent_trials": 2, "tune.scheduler": "fifo"},
    )
    log = tmp_path / "log"
    log.mkdir()

    def trainable(params):
        me = tune.get_context().get_trial_id()
        (log / f"{me}.start").write_text(str(time.time()))
        time.sleep(3)
        (log / f"{me}.end").write_text(str(time.time()))
        # a trial's last report, as the sweep's trials end (its final report of its last stage)
        tune.report({"valid_loss": params["params"]["train.lr"], "final": True, "stage": 0})

    tuner = new_tuner(
        cfg,
        tune.with_resources(trainable, {"cpu": 0.25}),
        reports=1,
        max_concurrent=2,
        storage=str(tmp_path / "tune"),
    )
    assert not tuner.fit().errors
    spans = [
        (float((log / f"{t}.start").read_text()), float((log / f"{t}.end").read_text()))
        for t in {p.stem for p in log.iterdir()}
    ]
    assert len(spans) == 4
    running_at = [sum(a <= s < b for a, b in spans) for s, _ in spans]
    assert max(running_at) == 2  # two at a time: the limit is reached, never passed
    # the console: one line of the project's own per trial event, no Tune status table or per-trial box
    # (Tune's heading, where the experiment is, still opens it)
    out = capsys.readouterr().out
    for trial in {p.stem for p in log.iterdir()}:
        assert re.search(rf"^\[tune\] trial {trial} starts: .*train\.lr=[0-9.e-]+$", out, re.M), out
        assert re.search(rf"^\[tune\] trial {trial}: valid_loss [0-9.]+$", out, re.M), out
        assert re.search(rf"^\[tune\] trial {trial} finished: valid_loss [0-9.]+$", out, re.M), out
    assert "Trial status" not in out and "started with configuration" not in out, out


@pytest.mark.ray
def test_the_console_says_which_trial_stopped_short_and_which_failed(ray_4cpus, tmp_path, capsys):
    """A trial whose last report is not its final one of the last stage reads as stopped early; a trial that
    raises reads as failed, naming its error file."""
    from ray import tune

    from ray_lifelong.sweep import new_tuner

    cfg = with_values(load_config(TUNE_KI), {"tune.num_samples": 2, "tune.max_concurrent_trials": 2,
                                             "tune.scheduler": "fifo", "ray.max_failures": 0})

    def trainable(params):
        if tune.get_context().get_trial_id().endswith("_00001"):
            raise ValueError("this trial fails")
        tune.report({"valid_loss": 2.0, "step": 4, "final": False, "stage": 0})

    grid = new_tuner(cfg, tune.with_resources(trainable, {"cpu": 0.25}), reports=1, max_concurrent=2,
                     storage=str(tmp_path / "tune")).fit()
    out = capsys.readouterr().out
    short = [r for r in grid if r.error is None]
    assert len(short) == 1 and len(grid.errors) == 1
    assert re.search(r"^\[tune\] trial \w+ stopped early by the scheduler: step 4, valid_loss 2\.0000$", out,
                     re.M), out
    assert re.search(r"^\[tune\] trial \w+ failed \(error in \S+error\.txt\)$", out, re.M), out
