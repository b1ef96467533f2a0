"""Function-preserving model growth (ELLE / bert2BERT) for BERT and GPT-2, pure torch/transformers.

* :func:`expand` grows a ``BertForMaskedLM`` or ``GPT2LMHeadModel`` in width and depth.
* :func:`remap_optimizer_state` carries AdamW's state onto the grown parameters.
* :func:`max_logit_error` / :func:`logit_errors` measure how well a growth preserved the function.
"""

from ray_lifelong.growth.check import logit_errors, max_logit_error
from ray_lifelong.growth.depth import DEPTH_INITS, DEPTH_PLACEMENTS
from ray_lifelong.growth.expand import expand, model_sizes
from ray_lifelong.growth.optim import remap_optimizer_state
from ray_lifelong.growth.plan import GrowthMapping, ParamPlan, UnitMap

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
    "remap_optimizer_state",
]
