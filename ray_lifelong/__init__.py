"""ray_lifelong: lifelong pre-training of language models on Ray (KI, ELLE growth, replay, prompts)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
