"""Build BERT (MLM), GPT-2 and Llama (causal LM) models from size fields, load saved ones (RoBERTa too),
and compute their LM outputs.

Models are randomly initialised from a config or loaded from local directories: nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ray_lifelong.config.schema import ModelConfig
from ray_lifelong.data.packing import IGNORE_INDEX
from ray_lifelong.models.arch import arch_of_model_type, is_causal, supported_model_types


def padded_vocab(tokens: int, multiple: int) -> int:
    """The model's vocabulary (embedding rows) for a tokenizer of ``tokens`` entries; the extra rows are
    never inputs or targets, their logits learn to stay low."""
    return -(-tokens // multiple) * multiple


def build_model(cfg: ModelConfig, vocab_size: int, *, pad_id: int | None = None, eos_id: int | None = None,
                seed: int = 0):
    """A fresh ``BertForMaskedLM``, ``GPT2LMHeadModel`` or ``LlamaForCausalLM`` with the configured sizes
    and a vocabulary of ``vocab_size`` tokens (rounded up to ``cfg.vocab_multiple`` rows).

    ``pad_id``, ``eos_id``: the tokenizer's (``None`` where it has none). The causal LMs take the EOS as
    their BOS too: packed rows separate documents with it, so it is also what starts the next one.
    """
    from transformers import (
        BertConfig,
        BertForMaskedLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

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
    if cfg.arch == "llama":
        hf = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.kv_heads(),
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=cfg.rope_theta,
            tie_word_embeddings=cfg.ties_embeddings(),
            attention_dropout=cfg.dropout,
            # no pad fallback to the EOS: Llama's embedding zeroes the gradient of its padding row
            pad_token_id=pad_id,
            bos_token_id=eos_id,
            eos_token_id=eos_id,
        )
        return LlamaForCausalLM(hf)
    raise ValueError(f"unknown architecture {cfg.arch!r}")


def model_arch(model) -> str:
    """``bert``, ``gpt2`` or ``llama`` of a loaded model (its config's ``model_type``; Mistral and Qwen2
    are of the ``llama`` family, :mod:`ray_lifelong.models.arch`)."""
    arch = arch_of_model_type(getattr(getattr(model, "config", None), "model_type", None))
    if arch is None:
        raise ValueError(f"unsupported model class {type(model).__name__}; supported model types: "
                         f"{supported_model_types()}")
    return arch


def saved_model_arch(model_dir: str) -> str:
    """``bert``, ``gpt2`` or ``llama`` of a saved HF model directory (its ``config.json``'s ``model_type``;
    Mistral and Qwen2 are of the ``llama`` family).

    Raises:
        ValueError: naming the directory and its model type when the project does not train it.
    """
    import json
    from pathlib import Path

    kind = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
    arch = arch_of_model_type(kind)
    if arch is None:
        raise ValueError(f"{model_dir}: model type {kind!r}; supported: {supported_model_types()}")
    return arch


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
    sizes is most of the compute (the output layer is d x V). For causal LM (GPT-2, Llama) every position
    but the last predicts the next token. Returns ``(logits (M, V), targets (M,))``; the loss is computed
    by the caller, so distillation (KI) can reuse the same logits.
    """

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.arch = model_arch(model)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        if not is_causal(self.arch):
            # the encoder (BERT's ``bert``, RoBERTa's ``roberta``, which numbers positions after its
            # padding index itself), then the MLM head (``cls``, RoBERTa's ``lm_head``) at the masked
            # positions only
            hidden = self.model.base_model(input_ids=input_ids).last_hidden_state  # (B, T, d)
            head = self.model.cls if hasattr(self.model, "cls") else self.model.lm_head
            keep = labels != IGNORE_INDEX
            return head(hidden[keep]), labels[keep]  # (M, V), (M,)
        # the decoder without its LM head (GPT-2's ``transformer``, Llama's ``model``), which then runs
        # only where there are targets
        body = self.model.transformer if self.arch == "gpt2" else self.model.model
        hidden = body(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, d)
        targets = input_ids[:, 1:]
        if labels is not None:
            targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        return self.model.lm_head(hidden[keep]), targets[keep]


def position_rows(labels: torch.Tensor, arch: str) -> torch.Tensor:
    """The batch row of each of :class:`LMObjective`'s supervised positions, in its (row-major) order."""
    keep = labels[:, 1:] != IGNORE_INDEX if is_causal(arch) else labels != IGNORE_INDEX
    return torch.repeat_interleave(torch.arange(len(labels), device=labels.device), keep.sum(1))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.float(), targets, reduction=reduction)


def count_parameters(model) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": emb, "non_embedding": total - emb}


def load_model(path: str, arch: str | None = None):
    """Load a saved HF model directory (a stage checkpoint's ``model/``, a final export or the checkpoint of
    ``model.init_from``), offline, in float32: a checkpoint published in bf16 trains with float32 weights and
    optimizer state like every other (bf16 is autocast's, on GPU)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, GPT2LMHeadModel

    # the saved model_type picks the class within a family (BERT or RoBERTa; Llama, Mistral or Qwen2)
    cls = {"bert": AutoModelForMaskedLM, "gpt2": GPT2LMHeadModel, "llama": AutoModelForCausalLM}[
        arch or saved_model_arch(path)]
    return cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)


def load_classifier(model_dir: str, num_labels: int, pad_id: int):
    """A sequence classifier on the pre-trained LM of a local HF directory, its head new: BERT pools
    ``[CLS]``; GPT-2 and Llama pool the last token that is not ``pad_id`` (so right padding works; their
    tokenizers have no pad token and pad with the EOS, which the examples do not contain)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=num_labels,
                                                               local_files_only=True)
    # set after loading: at construction it would make Llama's embedding zero the pad row's gradient
    model.config.pad_token_id = pad_id
    return model
