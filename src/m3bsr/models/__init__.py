"""Models: pure torch, tensors and configs in, scores and named losses out. Never read files.

``SequentialRecommender`` is imported on first use, so the registry's name check (``--model nosuch``)
imports no torch."""

from m3bsr.models.registry import build_model, model_config_class, model_names

__all__ = ["SequentialRecommender", "build_model", "model_config_class", "model_names"]


def __getattr__(name: str):
    if name == "SequentialRecommender":
        from m3bsr.models.base import SequentialRecommender

        return SequentialRecommender
    raise AttributeError(f"module 'm3bsr.models' has no attribute {name!r}")
