"""The console filter: Ray's known internal messages dropped, the project's lines and real errors kept."""

from ray_lifelong.console import keep_lines

# lines as Ray forwards them from its worker processes (captured from a demo run)
RAY_NOISE = [
    "[2026-12-07 01:11:24,058 E 4785 4815] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '31fc8ffb89ad29c0340fa7b801000000' has constructor arguments in the object store and "
    "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
    "will fail. See https://github.com/ray-project/ray/issues/53727 for more details.",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars "
    "= True`.",
    "Reporting training result 1: TrainingReport(checkpoint=None, metrics={'stage': 0, 'step': 30}, "
    "validation=False) from rank 1",
    "/x/ray/data/_internal/execution/interfaces/execution_options.py:436: RayDeprecationWarning: "
    "`ExecutionOptions.exclude_resources` is deprecated and will be removed after January 2027.",
    "  self.exclude_resources = exclude_resources",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing "
    "to monitor.",
    "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless "
    "more CPUs are freed up. A common reason is that cluster resources are used by Actors or Tune trials; "
    "see the following link for more details: "
    "https://docs.ray.io/en/latest/data/data-internals.html#ray-data-and-tune",
    "[2026-12-07 07:06:05,096 E 16503 16503] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor "
    "bf106a8f732ca386bba8489f01000000, return status: Invalid: KillActor RPC failed for actor "
    "bf106a8f732ca386bba8489f01000000: RpcError: RPC error: Socket closed rpc_code: 14",
    "Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = "
    "True`.\x1b[32m [repeated 2x across cluster] (Ray deduplicates logs by default. Set "
    "RAY_DEDUP_LOGS=0)\x1b[0m",
    "Detected that the Ray Train controller actor (6105ce40ccbdb088043643c201000000) is dead. Cleaning up "
    "placement group = [PlacementGroupID(3246c8fec7cbe41cf9d7d06536d201000000)] created by this run.",
    # a sweep trial's function trainable around its Tune checkpoints
    "Checkpoint successfully created at: Checkpoint(filesystem=local, path=/r/pbt/tune/_pbt_trial_10db4_0"
    "0001_1"
    "_ki_inherit_alpha0=0.6808,train_lr=0.0000_2026-12-07_13-42-38/checkpoint_000000)",
    "Restored on 192.0.2.2 from checkpoint: Checkpoint(filesystem=local, path=/r/pbt/tune/_pbt_trial_10db4_"
    "0000"
    "0_0_ki_inherit_alpha0=0.3421,train_lr=0.0030_2026-12-07_13-42-37/checkpoint_000000)",
]


def test_ray_noise_is_dropped_and_the_projects_lines_and_errors_kept():
    own_lines = ["[stage 00-sports] step 10/60 loss 4.8683 lr 1.75e-03 tok/s 1,171 ETA stage 0:12, run ~1:02",
                 "[run] memory of 'sports': 75 sequences -> /r/memory/00-sports",
                 "[stage 10db4_00001/00-sports-seg1] step 8/8 loss 4.2640 lr 1.50e-03",
                 "[pbt] 10db4_00001: segment 1 continues /r/trials/10db4_00000/checkpoints/c (10db4_00000)"]
    errors = ["Traceback (most recent call last):", '  File "loop.py", line 3, in f',
              "ValueError: the tokenizer has 12 tokens but the model's vocabulary only 8"]
    own, other = keep_lines(RAY_NOISE[:3] + own_lines[:1] + RAY_NOISE[3:] + own_lines[1:] + errors)
    assert own == own_lines
    assert other == errors  # a traceback's indented lines stay: only a dropped warning's source line goes


def test_a_repeated_line_of_our_own_loses_rays_dedup_suffix():
    repeated = "[stage 01-cooking] start at step 0/60\x1b[32m [repeated 2x across cluster]\x1b[0m"
    own, other = keep_lines([repeated])
    assert own == ["[stage 01-cooking] start at step 0/60"] and other == []


def test_a_blank_forwarded_line_is_dropped_not_printed_as_a_bare_process_prefix():
    own, other = keep_lines(["", "   ", "[run] stages: 2", "\t", "ValueError: x"])
    assert own == ["[run] stages: 2"] and other == ["ValueError: x"]
