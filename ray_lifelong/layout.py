"""Where a run keeps what it writes: the one owner of the run directory's layout.

``<output_dir>/<run_name>/``::

    config.yaml         resolved config
    tokenizer/          the HF tokenizer (trained here unless ``tokenizer.path`` or ``model.init_from``
                        gives one; with ``continual.prompts`` a checkpoint's gets the domains' prompts)
    init/               with ``model.init_from``: stage 0's starting model (``model/``, prompt rows added)
                        and, for a URI, the copy of it (``source/``)
    packed/             with ``data.pretokenize``: each domain's packed rows (``data.packed_path`` moves it)
    memory/             with replay: each finished domain's memory (``continual.replay.memory_path`` moves it)
    checkpoints/        Ray Train storage (``ray.storage_path`` moves it): one run for consecutive stages
                        of one ``scaling``, named after its first, ``<run>-stage<i>-<domain>/checkpoint_*``
    stages/<ii>-<domain>/stage.json  completion marker + the stage's record (and its warmup's, under ``frw``)
    results.json  report.md  ppl_matrix_and_loss.png
    tensorboard/        TensorBoard event files (``logging.tensorboard``); mlflow_run_id: the MLflow run
                        a resumed run keeps logging to (``logging.mlflow``)
    final_model/        HF model + tokenizer of the last stage (AutoModelFor...from_pretrained)

A sweep (``ray-lifelong tune``) and a KI experiment (``ray-lifelong ki``) keep their runs beside their own
files under the same root; see :mod:`ray_lifelong.sweep` and :mod:`ray_lifelong.ki`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ray_lifelong.config.schema import LifelongConfig


@dataclass(frozen=True)
class RunLayout:
    root: Path
    """The run directory, absolute."""
    storage: str
    """Ray Train's storage (local path or URI)."""
    packed: str
    """``data.pretokenize``'s packed domains (local path or URI)."""
    memory: str
    """Replay memories (local path or URI)."""

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def init(self) -> Path:
        """``model.init_from``'s checkpoint as stage 0 starts from it: ``model/`` beside ``init.json``, which
        says what it was made from (see :func:`ray_lifelong.models.init_from.prepare_start_model`)."""
        return self.root / "init"

    @property
    def stages(self) -> Path:
        return self.root / "stages"

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def mlflow_run_id(self) -> Path:
        return self.root / "mlflow_run_id"

    @property
    def final_model(self) -> Path:
        return self.root / "final_model"

    def stage_marker(self, label: str) -> Path:
        """``stage.json`` of the stage (or warmup) ``label``: present once the stage has finished."""
        return self.stages / label / "stage.json"

    def has_finished_stages(self) -> bool:
        return any(self.stages.glob("*/stage.json"))


def stage_name(run_name: str, index: int, domain: str, segment: int | None = None) -> str:
    """A stage's Ray Train run name (its checkpoints' folder under the storage): deterministic, so that
    running the stage again resumes from its checkpoints."""
    return f"{run_name}-stage{index}-{domain}" + ("" if segment is None else f"-seg{segment}")


def run_layout(cfg: LifelongConfig, root: str | Path | None = None) -> RunLayout:
    """The layout of ``cfg``'s run: ``<output_dir>/<run_name>/`` (or ``root``, a run directory found
    elsewhere) and the places its keys move."""
    root = Path(root).resolve() if root is not None else (Path(cfg.output_dir) / cfg.run_name).resolve()
    return RunLayout(root=root, storage=cfg.ray.storage_path or str(root / "checkpoints"),
                     packed=cfg.data.packed_path or str(root / "packed"),
                     memory=cfg.continual.replay.memory_path or str(root / "memory"))
