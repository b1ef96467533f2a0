"""A saved Hugging Face model that a run may start from (``model.init_from``), as the config sees it before
any weights are read: its ``config.json`` and file listing (cheap, also for a URI), what the run's config
takes from it, whether it can grow, and a local copy of a URI.

Only files and the architecture table: the config's loader checks ``model.init_from`` with these, so this
module imports nothing of the config (a loader that imported the model code would import itself).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from ray_lifelong.data.sources import DataError, filesystem, join_uri
from ray_lifelong.models.arch import arch_of_model_type, supported_model_types

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")
"""The weight files ``from_pretrained`` reads (one of them, or an index of shards)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
DROPOUT_KEYS = {"bert": ("hidden_dropout_prob", "attention_probs_dropout_prob"),
                 "gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "llama": ("attention_dropout",)}
"""Where each architecture's config keeps the dropout ``model.dropout`` sets (as ``build_model`` does)."""


class CheckpointError(ValueError):
    """A ``model.init_from`` that cannot start a run; the message names the path and what is wrong."""


@dataclass(frozen=True)
class SavedModel:
    """What ``model.init_from`` points at, read from its ``config.json`` and file listing."""

    source: str
    """``model.init_from`` as given."""
    model_dir: str
    """The Hugging Face model directory within it (the source itself, its ``final_model/`` or ``model/``):
    a local path, or a URI when the source is one."""
    config: dict
    """Its ``config.json``."""
    files: tuple[str, ...]
    """The names of the files in ``model_dir``."""

    @property
    def model_type(self) -> str:
        return self.config.get("model_type")

    @property
    def arch(self) -> str:
        """``bert``, ``gpt2`` or ``llama`` (:func:`inspect_checkpoint` refuses any other)."""
        return arch_of_model_type(self.model_type)

    @property
    def rows(self) -> int:
        """Embedding rows (the vocabulary the weights hold, padding rows included)."""
        return int(self.config["vocab_size"])

    @property
    def has_tokenizer(self) -> bool:
        return any(f in self.files for f in TOKENIZER_FILES)

    def hf_config(self):
        """The transformers config of ``config.json``, every default filled in."""
        from transformers import CONFIG_MAPPING

        return CONFIG_MAPPING[self.model_type].from_dict(self.config)


def _is_uri(path: str) -> bool:
    return "://" in path


def inspect_checkpoint(path: str) -> SavedModel:
    """Find the Hugging Face model of ``path`` (a model directory, a run directory's ``final_model/``, a
    stage checkpoint's ``model/``; local or a URI) and read its ``config.json``; files are not copied.

    Raises:
        CheckpointError: naming ``path``: nothing there, no ``config.json``, no weights, or a model type
            the project does not train.
    """
    if _is_uri(path):
        return _inspect_uri(path)
    root = Path(path).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"{path}: no such directory")
    for sub in ("final_model", "model", ""):
        d = root / sub if sub else root
        if (d / "config.json").is_file():
            files = tuple(sorted(p.name for p in d.iterdir() if p.is_file()))
            return _checked(path, str(d.resolve()), (d / "config.json").read_text(), files)
    raise CheckpointError(f"{path}: no config.json (looked in final_model/, model/ and the directory itself)")


@functools.lru_cache(maxsize=16)
def _inspect_uri(uri: str) -> SavedModel:
    """:func:`inspect_checkpoint` of a URI, read once per process: a sweep loads its trials' configs often."""
    try:
        fs, root = filesystem(uri)
    except DataError as e:
        raise CheckpointError(str(e)) from None
    root = root.rstrip("/")
    for sub in ("final_model", "model", ""):
        d = f"{root}/{sub}" if sub else root
        try:
            infos = fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        except OSError as e:
            raise CheckpointError(f"{uri}: cannot list it ({e})") from None
        files = tuple(sorted(i.base_name for i in infos if i.type == pafs.FileType.File))
        if "config.json" in files:
            with fs.open_input_stream(f"{d}/config.json") as f:
                text = f.read().decode()
            return _checked(uri, join_uri(uri, sub) if sub else uri, text, files)
    raise CheckpointError(f"{uri}: no config.json (looked in final_model/, model/ and the URI itself)")


def _checked(source: str, model_dir: str, config_text: str, files: tuple[str, ...]) -> SavedModel:
    try:
        config = json.loads(config_text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{model_dir}/config.json is not JSON ({e})") from None
    if not any(w in files for w in WEIGHTS):
        raise CheckpointError(f"{model_dir}: config.json but no weights (model.safetensors or "
                              f"model.safetensors.index.json)")
    kind = config.get("model_type")
    if arch_of_model_type(kind) is None:
        raise CheckpointError(f"{model_dir}: model type {kind!r} is not supported; supported: "
                              f"{supported_model_types()}")
    if "vocab_size" not in config:
        raise CheckpointError(f"{model_dir}/config.json has no vocab_size")
    return SavedModel(source=source, model_dir=model_dir, config=config, files=files)


def model_fields(saved: SavedModel) -> dict:
    """The ``model.*`` values of the checkpoint: ``arch``, the sizes, ``max_position_embeddings`` (the
    positions a sequence may use), ``dropout``, and for Llama ``rope_theta`` and ``tie_embeddings``."""
    c, arch = saved.hf_config(), saved.arch
    if arch == "gpt2":
        return {"arch": arch, "num_layers": c.n_layer, "hidden_size": c.n_embd, "num_heads": c.n_head,
                "intermediate_size": c.n_inner or 4 * c.n_embd, "num_kv_heads": None,
                "max_position_embeddings": c.n_positions, "dropout": float(c.resid_pdrop)}
    out = {"arch": arch, "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
           "num_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size}
    if arch == "bert":
        positions = c.max_position_embeddings
        if saved.model_type == "roberta":
            # RoBERTa numbers positions from padding_idx + 1: two rows of its table are never a position
            positions -= (c.pad_token_id if c.pad_token_id is not None else 1) + 1
        return {**out, "num_kv_heads": None, "max_position_embeddings": positions,
                "dropout": float(c.hidden_dropout_prob)}
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta") or getattr(c, "rope_theta", 10000.0)
    return {**out, "num_kv_heads": c.num_key_value_heads or c.num_attention_heads,
            "max_position_embeddings": c.max_position_embeddings, "rope_theta": float(rope),
            "tie_embeddings": bool(c.tie_word_embeddings), "dropout": float(c.attention_dropout)}


def growth_problems(saved: SavedModel, deeper: bool) -> list[str]:
    """Why a run could not grow this checkpoint (the same limits :func:`ray_lifelong.growth.expand` has),
    found before the run starts; ``deeper``: some growth adds layers."""
    c, kind, problems = saved.hf_config(), saved.model_type, []
    if saved.arch == "bert" and getattr(c, "position_embedding_type", "absolute") not in (None, "absolute"):
        problems.append(f"{kind} with {c.position_embedding_type} position embeddings (growth keeps absolute "
                        "ones only)")
    if kind == "gpt2":
        if c.add_cross_attention:
            problems.append("GPT-2 with cross-attention")
        if deeper and c.scale_attn_by_inverse_layer_idx:
            problems.append("depth growth of a GPT-2 with scale_attn_by_inverse_layer_idx=true (the "
                            "attention scale depends on the layer index)")
    if saved.arch == "llama":
        head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if head * c.num_attention_heads != c.hidden_size:
            problems.append(f"head_dim {head} x {c.num_attention_heads} heads is not hidden_size "
                            f"{c.hidden_size} (growth keeps the head size hidden_size / num_heads)")
    return [f"cannot grow the {kind} of {saved.model_dir}: {p}" for p in problems]


def local_model_dir(saved: SavedModel, cache: Path) -> str:
    """``saved``'s model directory on this machine: a local one as it is, a URI copied once into ``cache``
    (kept with a ``source.json`` naming the URI; a copy of another URI is replaced)."""
    if not _is_uri(saved.model_dir):
        return saved.model_dir
    marker = cache / "source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("uri") == saved.model_dir:
        return str(cache / "model")
    fs, root = filesystem(saved.model_dir)
    # copied beside the cache and moved into place whole, so a run that dies while copying leaves no half copy
    tmp = cache.with_name(f"{cache.name}.tmp-{uuid.uuid4().hex[:8]}")
    print(f"[init] copying {saved.model_dir} -> {cache}", flush=True)
    (tmp / "model").mkdir(parents=True)
    try:
        pafs.copy_files(root.rstrip("/"), str(tmp / "model"), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{saved.model_dir}: cannot copy it ({e})") from None
    (tmp / "source.json").write_text(json.dumps({"uri": saved.model_dir}))
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return str(cache / "model")
