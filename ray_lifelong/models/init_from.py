"""The model a run starts from (``model.init_from``), written on the driver when the run starts: a URI copied
once, and the vocabulary grown by the domains' prompt tokens. Stage 0's workers then load it as any stage
loads the previous stage's checkpoint. What the config reads of the checkpoint beforehand is
:mod:`ray_lifelong.models.saved`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from ray_lifelong.config.schema import LifelongConfig
from ray_lifelong.layout import run_layout
from ray_lifelong.models.build import load_model, padded_vocab
from ray_lifelong.models.saved import (
    DROPOUT_KEYS,
    SavedModel,
    inspect_checkpoint,
    local_model_dir,
    model_fields,
)


@torch.no_grad()
def add_token_rows(model, ids: Sequence[int], rows: int, known: int) -> None:
    """Give ``model`` ``rows`` vocabulary rows (never fewer than it has) and set the rows of the new tokens
    ``ids`` and of every row it did not have to the mean of the rows ``[0, known)`` (its tokenizer's own
    tokens), in the input embedding, an untied output layer and an output bias alike. Old rows are kept.

    Why the mean: a new token's logit is then the mean of the known tokens' logits (``h . mean(E) +
    mean(b)``), and ``exp(mean z) <= mean exp(z)``, so it takes at most the average known token's share of
    the softmax and the known tokens' probabilities barely move; as an input, a domain prompt starts as an
    average token rather than as a random direction the layers never saw.
    """
    old = model.get_input_embeddings().weight.shape[0]
    if rows < old:
        raise ValueError(f"the model has {old} vocabulary rows; {rows} would drop some")
    if rows > old:
        model.resize_token_embeddings(rows, mean_resizing=False)
    fill = torch.tensor(sorted(set(ids) | set(range(old, rows))), dtype=torch.long)
    if fill.numel() == 0:
        return
    emb = model.get_input_embeddings().weight
    emb[fill] = emb[:known].mean(0)
    out = model.get_output_embeddings()
    if out is not None and out.weight is not emb:
        out.weight[fill] = out.weight[:known].mean(0)
    if out is not None and getattr(out, "bias", None) is not None:
        out.bias[fill] = out.bias[:known].mean()


def prepare_start_model(cfg: LifelongConfig, *, tokens: int, new_ids: Sequence[int], known: int) -> str:
    """Write stage 0's starting model under the run's ``init/`` (once: a finished one for the same inputs is
    kept) and return that directory, which holds ``model/`` as a stage checkpoint does.

    Args:
        tokens: the run tokenizer's size; the model gets at least as many rows (``model.vocab_multiple``
            rounds them up where the checkpoint has too few).
        new_ids: the run tokenizer's ids that the checkpoint does not know (domain prompt tokens), whose
            rows :func:`add_token_rows` sets to the mean.
        known: how many leading rows hold the checkpoint's own tokens.

    Nothing to change (no new token, rows and dropout as saved): ``model/`` links to the checkpoint's
    directory. Else the model is loaded here, given its rows and ``model.dropout``, and saved.
    """
    lay = run_layout(cfg)
    saved = inspect_checkpoint(cfg.model.init_from)
    local = local_model_dir(saved, lay.init / "source")
    rows = _rows(saved, tokens, cfg.model.vocab_multiple)
    dropout = cfg.model.dropout
    record = {"init_from": cfg.model.init_from, "model_dir": saved.model_dir, "rows": rows,
              "new_token_ids": list(new_ids), "known_rows": known, "dropout": dropout}
    marker, out = lay.init / "init.json", lay.init / "model"
    if marker.is_file() and json.loads(marker.read_text()) == record and out.exists():
        return str(lay.init)
    marker.unlink(missing_ok=True)
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    lay.init.mkdir(parents=True, exist_ok=True)
    if not new_ids and rows == saved.rows and dropout == model_fields(saved)["dropout"]:
        out.symlink_to(Path(local).resolve(), target_is_directory=True)
    else:
        model = load_model(local, saved.arch)
        for key in DROPOUT_KEYS[saved.arch]:  # read when the workers build the model from the saved config
            setattr(model.config, key, dropout)
        add_token_rows(model, new_ids, rows, known)
        model.save_pretrained(out)
        print(f"[init] {saved.model_dir}: {len(new_ids)} prompt token(s) added, {rows} vocabulary rows -> "
              f"{out}", flush=True)
    marker.write_text(json.dumps(record))
    return str(lay.init)


def student_rows(cfg: LifelongConfig, tokens: int) -> int:
    """The vocabulary rows of ``cfg``'s model for a tokenizer of ``tokens`` tokens (growth keeps them): a
    model built from sizes pads them to ``model.vocab_multiple``; a run from ``model.init_from`` keeps its
    checkpoint's rows (more where its tokenizer outgrew them), as prepared under the run's ``init/``."""
    if not cfg.model.init_from:
        return padded_vocab(tokens, cfg.model.vocab_multiple)
    prepared = run_layout(cfg).init / "model" / "config.json"
    if prepared.is_file():
        return json.loads(prepared.read_text())["vocab_size"]
    return _rows(inspect_checkpoint(cfg.model.init_from), tokens, cfg.model.vocab_multiple)


def _rows(saved: SavedModel, tokens: int, multiple: int) -> int:
    """The checkpoint's rows, or more (padded) where the tokenizer has more tokens than it has rows."""
    return max(saved.rows, padded_vocab(tokens, multiple) if tokens > saved.rows else 0)
