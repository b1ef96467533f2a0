"""``ray-lifelong`` / ``python -m ray_lifelong``: run a lifelong pipeline, train a tokenizer, write demo
data.

Each command imports what it needs inside its function: ``tokenizer`` and ``demo-data`` start in a second
without importing Ray, and a config error is reported before Ray starts."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-lifelong", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    on_ray = argparse.ArgumentParser(add_help=False)  # the commands that start or join Ray
    on_ray.add_argument("--verbose", action="store_true",
                        help="show Ray's own console messages too (by default: the project's lines and "
                        "errors)")
    run = sub.add_parser("run", parents=[on_ray],
                         help="run the lifelong pipeline of a config (one Ray Train stage per domain)")
    run.add_argument("config", help="YAML config (see configs/)")
    run.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=50 run_name=x")
    run.add_argument("--resume", action="store_true", help="skip finished stages, resume the unfinished one")
    ki = sub.add_parser(
        "ki", parents=[on_ray],
        help="Knowledge Inheritance: teacher, student with KI, student without (baseline)",
    )
    ki.add_argument("config")
    ki.add_argument("overrides", nargs="*")
    ki.add_argument("--resume", action="store_true", help="reuse finished runs of the experiment")
    tune = sub.add_parser(
        "tune",
        parents=[on_ray],
        help="Ray Tune sweep over config fields (the config's tune: section); each "
        "trial is a real run on Ray Train",
    )
    tune.add_argument("config")
    tune.add_argument("overrides", nargs="*")
    tune.add_argument("--resume", action="store_true", help="restore an interrupted sweep and finish it")
    ft = sub.add_parser(
        "finetune",
        parents=[on_ray],
        help="fine-tune a pre-trained model on the config's downstream tasks "
        "(finetune: section), every task and seed a Ray Train run",
    )
    ft.add_argument("config")
    ft.add_argument("overrides", nargs="*")
    ft.add_argument(
        "--model",
        default=None,
        help="model to fine-tune (default: finetune.model, else the run's "
        "final_model); a run dir, checkpoint or HF model dir",
    )
    pack = sub.add_parser(
        "pack",
        parents=[on_ray],
        help="tokenize and pack the config's domains once (data.pretokenize) before the "
        "runs that read them: later runs, or several side by side",
    )
    pack.add_argument("config")
    pack.add_argument("overrides", nargs="*")
    pack.add_argument(
        "--both-prompts",
        action="store_true",
        help="pack each domain with and without its prompt token (runs that differ in continual.prompts)",
    )
    tok = sub.add_parser("tokenizer", help="train a tokenizer on a sample of the config's domains")
    tok.add_argument("config")
    tok.add_argument("overrides", nargs="*")
    tok.add_argument("--out", required=True, help="output directory (a Hugging Face tokenizer directory)")
    status = sub.add_parser("status", help="where a run is (stages done, current stage and step, last "
                            "metrics, checkpoints), from its files: while it runs or after it died")
    status.add_argument("run_dir", help="the run directory (<output_dir>/<run_name>)")
    demo = sub.add_parser("demo-data", help="write the embedded synthetic multi-domain corpus")
    demo.add_argument("--out", default="data/demo")
    demo.add_argument("--train-docs", type=int, default=1200)
    demo.add_argument("--valid-docs", type=int, default=80)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (config, data, paths, a run that exists) exits 2 with one line
    naming the key, file or line; a failure while running exits 1 with its cause."""
    args = _parser().parse_args(argv)
    from ray_lifelong.config import ConfigError
    from ray_lifelong.data.sources import DataError

    try:
        return COMMANDS[args.command](args)
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, ValueError, OSError) as e:  # a stage, trial or job failed: its cause, in one line
        print(f"error: {e}", file=sys.stderr)
        return 1


def _config(args):
    from ray_lifelong.config import load_config

    return load_config(args.config, args.overrides)


def _demo_data(args) -> int:
    from ray_lifelong.data.demo import DEMO_DOMAINS, write_demo_corpus

    paths = write_demo_corpus(args.out, DEMO_DOMAINS, train_docs=args.train_docs, valid_docs=args.valid_docs)
    print(f"demo corpus in {args.out}: {', '.join(paths)}")
    return 0


def _tokenizer(args) -> int:
    from ray_lifelong.data.demo import prepare_demo
    from ray_lifelong.data.run_tokenizer import train_config_tokenizer

    cfg = _config(args)
    prepare_demo(cfg)
    tok = train_config_tokenizer(cfg, Path(args.out))
    print(f"tokenizer with {len(tok)} tokens written to {args.out}")
    return 0


@contextlib.contextmanager
def ray_session(cfg, verbose: bool = False):
    """Ray for one command: joined or started (:func:`init_ray`), its console quiet unless ``verbose``
    (:mod:`ray_lifelong.console`), shut down however the command ends."""
    import ray

    from ray_lifelong.console import quiet_console

    quiet_console(verbose)  # before ray.init, which installs Ray's printer of forwarded lines
    init_ray(cfg)
    try:
        yield
    finally:
        ray.shutdown()


def _pack(args) -> int:
    from ray_lifelong.pipeline import check_pretokenize, check_start, pack_domains

    cfg = _config(args)
    check_pretokenize(cfg)  # before starting Ray
    check_start(cfg)
    with ray_session(cfg, args.verbose):
        for rec in pack_domains(cfg, (True, False) if args.both_prompts else None):
            print(f"{rec['domain']}: {rec['rows']} sequences ({rec['tokens']:,} tokens) in {rec['uri']}")
    return 0


def _run(args) -> int:
    from ray_lifelong.pipeline import check_run_start, prepare_start, run_lifelong, unfinished_stages

    cfg = _config(args)
    check_run_start(cfg, args.resume)  # before starting Ray
    if cfg.model.init_from:  # its tokenizer and starting model too (a URI is copied now, once)
        prepare_start(cfg)
    with contextlib.ExitStack() as session:  # Ray only when a stage or a fine-tuning job is left to train
        start_ray = _starts_ray_once(session, cfg, args.verbose)
        if not args.resume or unfinished_stages(cfg):
            start_ray()
        summary = run_lifelong(cfg, resume=args.resume)
        if cfg.finetune.tasks:  # downstream evaluation of the final model, when the config lists tasks
            from ray_lifelong.downstream.run import run_finetune

            summary["downstream"] = run_finetune(cfg, start_ray=start_ray)
    print("AP (geometric) per stage:", ", ".join(f"{x:.2f}" for x in summary["AP"]))
    return 0


def _ki(args) -> int:
    from ray_lifelong.ki import run_ki_experiment
    from ray_lifelong.pipeline import check_start

    cfg = _config(args)
    check_start(cfg)  # before starting Ray
    with ray_session(cfg, args.verbose):
        summary = run_ki_experiment(cfg, resume=args.resume)
    print("KI saved (step-matched, FLOP-matched):", summary.get("saved_step_matched"),
          summary.get("saved_flop_matched"))
    return 0


def _tune(args) -> int:
    from ray_lifelong.pipeline import check_start
    from ray_lifelong.sweep import check_sweep_start, run_sweep

    cfg = _config(args)
    check_sweep_start(cfg, args.resume, args.config)  # before starting Ray
    check_start(cfg)
    with contextlib.ExitStack() as session:  # Ray only when a trial is left to run
        run_sweep(cfg, resume=args.resume, where=args.config, verbose=args.verbose,
                  start_ray=_starts_ray_once(session, cfg, args.verbose))
    return 0


def _finetune(args) -> int:
    from ray_lifelong.downstream.run import run_finetune

    cfg = _config(args)
    with contextlib.ExitStack() as session:  # Ray only when a job is left to train
        run_finetune(cfg, model=args.model, start_ray=_starts_ray_once(session, cfg, args.verbose))
    return 0


def _starts_ray_once(session: contextlib.ExitStack, cfg, verbose: bool):
    """A function that enters the command's :func:`ray_session` into ``session`` the first time it is
    called: a command calls it only when there is work for Ray left."""
    started = False

    def start() -> None:
        nonlocal started
        if not started:
            session.enter_context(ray_session(cfg, verbose))
            started = True

    return start


def _status(args) -> int:
    from ray_lifelong.status import format_status, run_status

    print(format_status(run_status(args.run_dir)))
    return 0


COMMANDS = {"run": _run, "ki": _ki, "tune": _tune, "finetune": _finetune, "pack": _pack,
            "tokenizer": _tokenizer, "demo-data": _demo_data, "status": _status}
"""Subcommand -> the function that runs it (the parser above lists their arguments)."""


def init_ray(cfg) -> None:
    """Join ``ray.address`` / ``RAY_ADDRESS`` (ray job submit) or start a local cluster."""
    import logging

    import ray

    quiet = {
        "RAY_DATA_LOG_LEVEL": "WARNING",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Ray Train's controller polls its workers at this interval (2 s by default): each stage's start,
        # reports and end wait for a poll, so a shorter one takes seconds off every stage
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
    for k, v in quiet.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # The package dir travels to the workers when running from a source checkout without install.
    pkg_root = str(Path(__file__).resolve().parent.parent)
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(filter(None, [pkg_root, os.environ.get("PYTHONPATH")])),
            **{k: os.environ[k] for k in quiet},
        }
    }
    job_env = _job_runtime_env()
    if job_env is not None:  # a `ray job submit` driver: Ray refuses to merge keys the job already sets
        if job_env.get("working_dir") or job_env.get("py_modules"):
            env["env_vars"].pop("PYTHONPATH")  # the code travels with the job
        for key in job_env.get("env_vars") or {}:
            env["env_vars"].pop(key, None)
    address = address or _running_cluster()
    if address:
        ray.init(address=address, logging_level=logging.WARNING, runtime_env=env)
        print(
            f"[ray] joined the running cluster at {address} ({ray.cluster_resources().get('CPU', 0):g} CPUs, "
            f"{ray.cluster_resources().get('GPU', 0):g} GPUs)",
            flush=True,
        )
    else:
        # the local cluster's processes inherit this process's environment: no runtime_env, so Ray starts
        # its workers directly (a runtime_env routes every worker start through an extra setup process)
        os.environ.update(env["env_vars"])
        # no node of a cluster on this machine is preempted: Ray Train's watcher would be one more actor
        # process started (and warning about its arguments) for every stage
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=cfg.ray.num_cpus, logging_level=logging.WARNING)
        print(
            "[ray] started a local cluster (no ray.address, RAY_ADDRESS or `ray start` cluster found)",
            flush=True,
        )


def _job_runtime_env() -> dict | None:
    """The runtime_env of the Ray job this driver runs in (set by the job supervisor), or None."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # the variable's name is its own value in Ray
    if not raw:
        return None
    return json.loads(raw).get("runtime_env") or {}


def _running_cluster() -> str | None:
    """The cluster that `ray start` last started on this machine, if its GCS is still running: running
    `ray-lifelong` on a head node then joins it instead of starting a second cluster beside it."""
    try:
        from ray._private import services  # private, but what `ray.init(address="auto")` itself uses

        last = services.find_bootstrap_address(None)
        return last if last and last in services.find_gcs_addresses() else None
    except Exception:  # any doubt: start a local cluster, as ray.init() would
        return None
