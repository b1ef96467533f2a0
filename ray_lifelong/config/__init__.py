"""Typed configs: ``load_config(path, overrides) -> LifelongConfig``."""

from ray_lifelong.config.load import ConfigError, load_config, save_config, to_yaml, validate, with_values
from ray_lifelong.config.schema import (
    DataConfig,
    DebugConfig,
    DemoConfig,
    DomainConfig,
    GrowthConfig,
    LifelongConfig,
    ModelConfig,
    RayConfig,
    ScalingConfig,
    TeacherConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "DebugConfig",
    "DemoConfig",
    "DomainConfig",
    "GrowthConfig",
    "LifelongConfig",
    "ModelConfig",
    "RayConfig",
    "ScalingConfig",
    "TeacherConfig",
    "TokenizerConfig",
    "TrainConfig",
    "load_config",
    "save_config",
    "to_yaml",
    "validate",
    "with_values",
]
