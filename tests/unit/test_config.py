from pathlib import Path

import pytest

from ray_lifelong.config import ConfigError, LifelongConfig, load_config, save_config
from ray_lifelong.config.plan import final_model_sizes, frw_steps_before, stage_model_sizes, stage_plans
from ray_lifelong.flops import planned_stages
from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
METHODS = sorted((REPO / "configs" / "methods").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "demo.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_loads(path, request, tmp_path):
    overrides = []
    if "init_from: ???" in path.read_text():  # it continues a checkpoint the user names: a tiny one here
        from tests.conftest import demo_texts, save_checkpoint_dir

        texts = demo_texts(request.getfixturevalue("demo_corpus"))
        overrides = [f"model.init_from={save_checkpoint_dir(tmp_path / 'ckpt', texts, 'llama')}",
                     "data.seq_len=64"]  # the tiny checkpoint's positions
        with pytest.raises(ConfigError, match=r"model\.init_from is \?\?\? \(required\)"):
            load_config(path)
    cfg = load_config(path, overrides)
    assert isinstance(cfg, LifelongConfig)
    assert cfg.data.domains, "a shipped config must list its domains"


def test_overrides_apply_and_keep_types():
    cfg = load_config(REPO / "configs/demo.yaml", ["train.steps=7", "train.lr=0.5", "run_name=x"])
    assert cfg.train.steps == 7 and cfg.train.lr == 0.5 and cfg.run_name == "x"
    assert isinstance(cfg.train.steps, int)


@pytest.mark.parametrize("override, key", [
    (["train.stpes=3"], "train.stpes"),
    (["model.hiden_size=3"], "model.hiden_size"),
    (["train.steps=abc"], "train.steps"),
    (["scaling.use_gpu=maybe"], "scaling.use_gpu"),
])
def test_unknown_keys_and_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/demo.yaml", override)


def test_unknown_key_in_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  warmpu_ratio: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*warmpu_ratio"):
        load_config(bad)


def test_cross_field_checks_name_keys():
    with pytest.raises(ConfigError, match=r"model\.hidden_size.*num_heads"):
        load_config(REPO / "configs/demo.yaml", ["model.hidden_size=65"])
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(REPO / "configs/demo.yaml", ["train.batch_size=10"])
    with pytest.raises(ConfigError, match=r"data\.on_bad_record"):
        load_config(REPO / "configs/demo.yaml", ["data.on_bad_record=ignore"])


def test_missing_file_and_malformed_override():
    with pytest.raises(ConfigError, match="not found"):
        load_config("nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(REPO / "configs/demo.yaml", ["train.steps"])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs/demo.yaml", ["train.steps=9"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert Path(tmp_path / "c.yaml").read_text().count("steps: 9") == 1


def test_run_wide_lr_schedule_offsets():

    cfg = load_config(REPO / "configs/demo.yaml", ["train.steps=10"])
    cfg.data.domains[1].steps = 30
    assert [p.schedule for p in stage_plans(cfg)] == [None] * 4
    cfg.train.lr_scope = "run"
    assert [p.schedule for p in stage_plans(cfg)] == [(0, 60), (10, 60), (40, 60), (50, 60)]
    with pytest.raises(ConfigError, match="train.lr_scope"):
        load_config(REPO / "configs/demo.yaml", ["train.lr_scope=global"])


@pytest.mark.parametrize("overlay", METHODS, ids=lambda p: p.stem)
def test_every_method_overlay_applies_to_the_elle_configs(overlay):
    for base in ("elle_demo.yaml",) + tuple(p.name for p in CONFIGS if p.name.startswith("elle_stream")):
        cfg = load_config(REPO / "configs" / base, [str(overlay)])
        grows = [d.grow is not None for d in cfg.data.domains]
        if overlay.stem in ("naive", "er", "logit_kd", "joint", "elle_no_growth", "scratch_large"):
            assert not any(grows)
        else:
            assert any(grows)
        assert cfg.continual.replay.enabled == (overlay.stem not in ("naive", "joint"))


def test_growth_final_starts_at_the_schedules_last_size():
    base = load_config(REPO / "configs/elle_demo.yaml")
    last = [d.grow for d in base.data.domains if d.grow][-1]
    cfg = load_config(REPO / "configs/elle_demo.yaml", ["continual.growth=final"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.model.intermediate_size) == \
        (last.num_layers, last.hidden_size, last.intermediate_size)
    assert cfg.model.num_heads == last.hidden_size // (base.model.hidden_size // base.model.num_heads)
    # idempotent: the saved (resolved) config loads to the same sizes
    again = load_config(REPO / "configs/elle_demo.yaml", ["continual.growth=final", "continual.growth=final"])
    assert again.model == cfg.model


def test_growth_optimizer_overrides_every_growth():
    cfg = load_config(REPO / "configs/elle_demo.yaml", ["continual.growth_optimizer=carry"])
    assert {d.grow.optimizer for d in cfg.data.domains if d.grow} == {"carry"}


@pytest.mark.parametrize("override, key", [
    (["continual.replay.enabled=false", "continual.frw.steps=5"], "continual.frw.steps"),
    (["continual.replay.ratio=1.5"], "continual.replay.ratio"),
    (["continual.replay.memory_fraction=0"], "continual.replay.memory_fraction"),
    (["continual.replay.weighting=random"], "continual.replay.weighting"),
    (["continual.growth=sometimes"], "continual.growth"),
    (["continual.joint=true"], "continual.joint"),
    (["continual.replay.enabled=false", "continual.frw.steps=0", "continual.logit_kd.weight=1"],
     "continual.logit_kd.weight"),
])
def test_continual_settings_are_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(REPO / "configs/elle_demo.yaml", override)


def test_a_missing_overlay_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(REPO / "configs/elle_demo.yaml", [str(tmp_path / "nothere.yaml")])


def test_key_value_overrides_reach_into_the_domain_list():
    cfg = load_config(REPO / "configs/demo.yaml", ["data.domains.1.lr=0.1", "data.domains.0.steps=7"])
    assert cfg.data.domains[1].lr == 0.1 and cfg.data.domains[0].steps == 7
    assert cfg.data.domains[0].lr is None
    with pytest.raises(ConfigError, match="data.domains"):
        load_config(REPO / "configs/demo.yaml", ["data.domains=5"])


def test_a_stage_can_take_its_own_workers_and_the_batch_is_checked_against_them():
    cfg = load_config(REPO / "configs/demo.yaml",
                      ["data.domains.1.scaling={num_workers: 2, cpus_per_worker: 0.25}"])
    assert cfg.data.domains[1].scaling.num_workers == 2 and cfg.data.domains[0].scaling is None
    with pytest.raises(ConfigError, match=r"data.domains\[1\].scaling.num_workers = 24"):
        load_config(REPO / "configs/demo.yaml", ["data.domains.1.scaling={num_workers: 3}"])


def test_placement_and_custom_resources_are_checked():
    cfg = load_config(REPO / "configs/demo.yaml", ["scaling.placement_strategy=STRICT_SPREAD",
                                                   "scaling.resources={trainer: 1}"])
    assert cfg.scaling.resources == {"trainer": 1.0}
    with pytest.raises(ConfigError, match=r"scaling\.placement_strategy.*STRICT_SPREAD"):
        load_config(REPO / "configs/demo.yaml", ["scaling.placement_strategy=spread_out"])
    with pytest.raises(ConfigError, match=r"data\.domains\[1\]\.scaling\.resources"):
        load_config(REPO / "configs/demo.yaml", ["data.domains.1.scaling={resources: {GPU: 1}}"])


def test_a_mapping_override_replaces_a_free_form_mapping_and_fills_a_typed_one():
    base = REPO / "configs/tune_ki.yaml"
    assert "train.lr" in load_config(base).tune.space
    cfg = load_config(base, ["tune.space={ki.inherit.alpha0: {uniform: [0.2, 0.8]}}"])
    assert list(cfg.tune.space) == ["ki.inherit.alpha0"]  # the whole space, not merged into the file's
    cfg = load_config(REPO / "configs/demo.yaml", ["data.domains.1.scaling={num_workers: 2}"])
    assert cfg.data.domains[1].scaling.num_workers == 2 and cfg.data.domains[1].scaling.cpus_per_worker == 0.5


def test_the_downstream_overlay_lists_five_tasks_and_finetune_settings_are_checked():
    overlay = str(REPO / "configs/finetune/downstream.yaml")
    cfg = load_config(REPO / "configs/elle_stream_gpt2.yaml", [overlay])
    assert [t.domain for t in cfg.finetune.tasks] == ["wb", "news", "reviews", "bio", "cs"]
    assert {t.metric for t in cfg.finetune.tasks} == {"accuracy", "micro_f1", "macro_f1"}
    with pytest.raises(ConfigError, match=r"finetune\.tasks\[0\]\.metric"):
        load_config(
            REPO / "configs/demo.yaml",
            ["finetune.tasks=[{name: a, train: [x], valid: [y], test: [z], metric: auc}]"],
        )
    with pytest.raises(ConfigError, match=r"finetune\.tasks\[0\]\.test"):
        load_config(REPO / "configs/demo.yaml", ["finetune.tasks=[{name: a, train: [x], valid: [y]}]"])
    with pytest.raises(ConfigError, match=r"finetune\.batch_size"):
        load_config(REPO / "configs/demo.yaml", ["finetune.batch_size=30", "finetune.micro_batch_size=8"])


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_the_gpu_stream_configs_follow_the_papers_base_schedule(arch):
    """ELLE's BERT growth schedule: L6_D384 -> 8/512 -> 10/640 -> 11/704 -> 12/768, head size 64, FFN 4x."""
    cfg = load_config(REPO / "configs/elle_stream_gpu.yaml", [f"model.arch={arch}"])
    m = cfg.model
    sizes = [(m.num_layers, m.hidden_size, m.intermediate_size)]
    sizes += [(d.grow.num_layers, d.grow.hidden_size, d.grow.intermediate_size) for d in cfg.data.domains[1:]]
    assert sizes == [(6, 384, 1536), (8, 512, 2048), (10, 640, 2560), (11, 704, 2816), (12, 768, 3072)]
    assert m.hidden_size // m.num_heads == 64 and m.arch == arch
    assert [d.name for d in cfg.data.domains] == ["wb", "news", "reviews", "bio", "cs"]
    assert cfg.scaling.use_gpu and cfg.continual.prompts and cfg.continual.replay.ratio == 0.1


def test_stage_sizes_follow_each_growth_and_frw_follows_the_pipelines_rule():
    """A heads-only growth widens hidden (head size fixed); FRW comes after a growth once a memory exists."""
    cfg = load_config(
        REPO / "configs/elle_demo.yaml",
        [
            "model.num_layers=1",
            "model.hidden_size=32",
            "model.num_heads=2",
            "model.intermediate_size=64",
            "continual.frw.steps=3",
            "data.domains.1.grow={num_layers: null, hidden_size: null, intermediate_size: null, "
            "num_heads: 4}",
        ],
    )
    sizes = stage_model_sizes(cfg)
    assert sizes[0] == {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64}
    assert sizes[1]["hidden_size"] == 64 and sizes[1]["num_heads"] == 4
    assert sizes[-1] == final_model_sizes(cfg)
    assert [frw_steps_before(cfg, i) for i in range(len(cfg.data.domains))] == [
        3 if i > 0 and d.grow is not None else 0 for i, d in enumerate(cfg.data.domains)
    ]
    no_frw = load_config(REPO / "configs/elle_demo.yaml", ["continual.frw.steps=0"])
    assert all(frw_steps_before(no_frw, i) == 0 for i in range(len(no_frw.data.domains)))
    plan = planned_stages(cfg, 100)
    assert plan[1]["sizes"] == (sizes[1]["num_layers"], 64, sizes[1]["intermediate_size"])
    assert plan[1]["steps"] == (cfg.data.domains[1].steps or cfg.train.steps) + 3
    # a stage's warmup follows the same rule, and only where the stage grows a previous stage's model
    from ray_lifelong.stage.spec import StageSpec

    def spec(i, init):
        return StageSpec(
            cfg=cfg,
            index=i,
            domain=cfg.data.domains[i].name,
            eval_domains=[],
            steps=5,
            batch_size=8,
            lr=1e-3,
            tokenizer_files={},
            init_checkpoint=init,
        )

    assert [spec(i, "ckpt").frw_steps for i in range(len(cfg.data.domains))] == [
        frw_steps_before(cfg, i) for i in range(len(cfg.data.domains))
    ]
    assert spec(1, None).frw_steps == 0 and spec(1, "ckpt").frw_lr == 1e-3


def test_a_negative_ki_step_count_is_refused():
    """N_KI < 0 would silently switch inheritance off (0 means 30% of the stage's steps)."""
    with pytest.raises(ConfigError, match=r"data\.domains\[0\]\.teacher\.steps"):
        load_config(REPO / "configs/ki_gpt2.yaml", ["data.domains.0.teacher={path: /tmp/t, steps: -1}"])


def test_a_stage_plan_resolves_every_default_once():
    cfg = load_config(REPO / "configs/elle_demo.yaml", ["train.steps=20", "continual.frw.steps=4"])
    cfg.data.domains[1].steps, cfg.data.domains[2].lr, cfg.data.domains[3].batch_size = 30, 1e-4, 32
    plans = stage_plans(cfg)
    assert [p.steps for p in plans] == [20, 30, 20, 20]
    assert [p.lr for p in plans] == [cfg.train.lr, cfg.train.lr, 1e-4, cfg.train.lr]
    assert [p.batch_size for p in plans] == [16, 16, 16, 32]
    assert [p.frw_steps for p in plans] == [0, 4, 4, 0]  # before the stages that grow
    assert [p.sizes["num_layers"] for p in plans] == [2, 3, 4, 4]
    assert all(p.ki_steps == 0 for p in plans)  # no teacher
    from ray_lifelong.config.plan import ki_steps
    from ray_lifelong.config.schema import TeacherConfig

    assert (
        ki_steps(TeacherConfig(path="t"), 100) == 30 and ki_steps(TeacherConfig(path="t", steps=7), 100) == 7
    )
    assert ki_steps(TeacherConfig(path="t"), 2) == 1  # at least one step


def test_stages_with_the_same_workers_share_one_ray_train_run():
    from ray_lifelong.config.plan import stage_groups

    doms = ("[{name: a, train: [x], valid: [x]}, {name: b, train: [x], valid: [x]}, "
            "{name: c, train: [x], valid: [x], scaling: {num_workers: 4}}, "
            "{name: d, train: [x], valid: [x], scaling: {num_workers: 4}}, "
            "{name: e, train: [x], valid: [x]}]")
    cfg = load_config(None, [f"data.domains={doms}", "train.micro_batch_size=4"])
    assert stage_groups(cfg) == [[0, 1], [2, 3], [4]]
    # a stage that names the run's own scaling is the same workers
    same = load_config(None, [f"data.domains={doms}", "train.micro_batch_size=4", "scaling.num_workers=4"])
    assert stage_groups(same) == [[0, 1, 2, 3, 4]]
