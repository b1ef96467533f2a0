"""The architectures a run trains, and the one map from a model's HF ``model_type`` to them.

``model.arch`` is ``bert`` (masked LM), ``gpt2`` or ``llama`` (causal LMs). A saved model is of the
``llama`` family when its ``model_type`` is one that :mod:`ray_lifelong.growth.llama` grows (Llama,
Mistral, Qwen2): they share the decoder block, the ``model`` / ``lm_head`` layout and the sizes this
project reads, so they load, train, distil and count FLOPs the same way. RoBERTa is of the ``bert`` family:
a post-LN masked LM with BERT's layer under the ``roberta.`` prefix (grown by the same rules), which only
differs in its position ids (they start after the padding index) and its ``<s>``/``</s>`` specials.
"""

from __future__ import annotations

from ray_lifelong.growth.llama import SUPPORTED as _LLAMA_CLASSES

ARCHS = ("bert", "gpt2", "llama")
"""The values of ``model.arch``."""
LLAMA_FAMILY = tuple(sorted(set(_LLAMA_CLASSES.values())))
"""HF model types treated as ``llama``: exactly those that growth supports."""
BERT_FAMILY = ("bert", "roberta")
"""HF model types treated as ``bert`` (masked LMs)."""
_CAUSAL = ("gpt2", "llama")


def arch_of_model_type(model_type: str | None) -> str | None:
    """``bert``, ``gpt2`` or ``llama`` for an HF ``model_type`` (``mistral`` -> ``llama``, ``roberta`` ->
    ``bert``); None when the project does not train it."""
    if model_type in BERT_FAMILY:
        return "bert"
    if model_type == "gpt2":
        return model_type
    if model_type in LLAMA_FAMILY:
        return "llama"
    return None


def is_causal(arch: str) -> bool:
    """Whether ``arch`` is a causal LM (next-token targets, no masking, no [CLS]/[SEP]); ``bert`` is the
    masked LM.

    Raises:
        ValueError: for an architecture the project does not know, rather than guessing its objective.
    """
    if arch == "bert":
        return False
    if arch in _CAUSAL or arch in LLAMA_FAMILY:
        return True
    raise ValueError(f"unknown architecture {arch!r}; supported: {', '.join(ARCHS)}")


def supported_model_types() -> str:
    """The model types a saved model may have, for error messages."""
    return ", ".join((*BERT_FAMILY, "gpt2", *LLAMA_FAMILY))
