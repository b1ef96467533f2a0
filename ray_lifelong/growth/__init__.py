"""Function-preserving model growth (ELLE / bert2BERT) for BERT, RoBERTa and GPT-2, and exact growth of
Llama-family decoders (Llama, Mistral, Qwen2), pure torch/transformers.

* :func:`expand` grows a ``BertForMaskedLM``, ``RobertaForMaskedLM``, ``GPT2LMHeadModel``,
  ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` in width and depth.
* :func:`new_entry_masks` says which entries of the grown model the growth added (to train only those).
* :func:`remap_optimizer_state` carries AdamW's state onto the grown parameters.
* :func:`max_logit_error` / :func:`logit_errors` measure how well a growth preserved the function.
"""

from ray_lifelong.growth.check import logit_errors, max_logit_error
from ray_lifelong.growth.depth import DEPTH_INITS, DEPTH_PLACEMENTS
from ray_lifelong.growth.expand import expand, model_sizes
from ray_lifelong.growth.optim import remap_optimizer_state
from ray_lifelong.growth.plan import GrowthMapping, ParamPlan, UnitMap, new_entry_masks

__all__ = [
    "DEPTH_INITS",
    "DEPTH_PLACEMENTS",
    "GrowthMapping",
    "ParamPlan",
    "UnitMap",
    "expand",
    "logit_errors",
    "max_logit_error",
    "model_sizes",
    "new_entry_masks",
    "remap_optimizer_state",
]
