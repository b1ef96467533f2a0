"""Build BERT (MLM) and GPT-2 (causal LM) models from size fields, and compute their LM outputs.

Models are randomly initialised from a config: nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ray_lifelong.config.schema import ModelConfig
from ray_lifelong.data.packing import IGNORE_INDEX


def padded_vocab(tokens: int, multiple: int) -> int:
    """The model's vocabulary (embedding rows) for a tokenizer of ``tokens`` entries; the extra rows are
    never inputs or targets, their logits learn to stay low."""
    return -(-tokens // multiple) * multiple


def build_model(cfg: ModelConfig, vocab_size: int, *, pad_id: int | None = None, eos_id: int | None = None,
                seed: int = 0):
    """A fresh ``BertForMaskedLM`` or ``GPT2LMHeadModel`` with the configured sizes and a vocabulary of
    ``vocab_size`` tokens (rounded up to ``cfg.vocab_multiple`` rows)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    vocab_size = padded_vocab(vocab_size, cfg.vocab_multiple)
    if cfg.arch == "bert":
        hf = BertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                        num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                        max_position_embeddings=cfg.max_position_embeddings,
                        hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                        pad_token_id=pad_id if pad_id is not None else 0)
        return BertForMaskedLM(hf)
    if cfg.arch == "gpt2":
        hf = GPT2Config(
            vocab_size=vocab_size,
            n_positions=cfg.max_position_embeddings,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.dropout,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
            # GPT-2's tanh GELU as one kernel; the default "gelu_new" is the same formula
            # written as ~8 element-wise ops (memory-bound on a GPU)
            activation_function="gelu_pytorch_tanh",
        )
        return GPT2LMHeadModel(hf)
    raise ValueError(f"unknown architecture {cfg.arch!r}")


def model_arch(model) -> str:
    """``bert`` or ``gpt2`` of a loaded model (by its class)."""
    name = type(model).__name__
    if name.startswith("Bert"):
        return "bert"
    if name.startswith("GPT2"):
        return "gpt2"
    raise ValueError(f"unsupported model class {name}")


def saved_model_arch(model_dir: str) -> str:
    """``bert`` or ``gpt2`` of a saved HF model directory (its ``config.json``'s ``model_type``).

    Raises:
        ValueError: naming the directory and its model type when it is neither.
    """
    import json
    from pathlib import Path

    kind = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    if kind not in ("bert", "gpt2"):
        raise ValueError(f"{model_dir}: model type {kind!r}; supported: bert, gpt2")
    return kind


def find_model_dir(path: str) -> str:
    """The HF model directory inside ``path``: a run directory (``final_model/``), a stage checkpoint
    (``model/``), or an HF model directory itself (``config.json``). Local paths only."""
    from pathlib import Path

    p = Path(path)
    for candidate in (p / "final_model", p / "model", p):
        if (candidate / "config.json").is_file():
            return str(candidate)
    raise FileNotFoundError(f"{path!r}: no Hugging Face model found (looked for final_model/, model/ "
                            f"and config.json)")


class LMObjective(nn.Module):
    """Wraps an HF LM so that DDP sees one forward returning logits at the supervised positions only.

    For MLM the vocabulary projection runs only at the masked positions (~15%), which at small model
    sizes is most of the compute (the output layer is d x V). For causal LM every position but the
    last predicts the next token. Returns ``(logits (M, V), targets (M,))``; the loss is computed by
    the caller, so distillation (KI) can reuse the same logits.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.arch = model_arch(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if self.arch == "bert":
            hidden = self.model.bert(input_ids=input_ids).last_hidden_state  # (B, T, d)
            keep = labels != IGNORE_INDEX
            return self.model.cls(hidden[keep]), labels[keep]  # (M, V), (M,)
        hidden = self.model.transformer(input_ids=input_ids, use_cache=False).last_hidden_state[
            :, :-1
        ]  # (B, T-1, d)
        targets = input_ids[:, 1:]
        if labels is not None:
            targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return self.model.lm_head(hidden[keep]), targets[keep]


def position_rows(labels: torch.Tensor, arch: str) -> torch.Tensor:
    """The batch row of each of :class:`LMObjective`'s supervised positions, in its (row-major) order."""
    keep = labels != IGNORE_INDEX if arch == "bert" else labels[:, 1:] != IGNORE_INDEX
    return torch.repeat_interleave(torch.arange(len(labels), device=labels.device), keep.sum(1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def load_model(path: str, arch: str | None = None):
    """Load a saved HF model directory (a stage checkpoint's ``model/`` or a final export), offline."""
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    cls = {"bert": BertForMaskedLM, "gpt2": GPT2LMHeadModel}[arch or saved_model_arch(path)]
    return cls.from_pretrained(path, local_files_only=True)
