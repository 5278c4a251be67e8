"""Models: pure torch, tensors and configs in, scores and named losses out. Never read files."""

from m3bsr.models.base import SequentialRecommender
from m3bsr.models.registry import build_model, model_config_class, model_names

__all__ = ["SequentialRecommender", "build_model", "model_config_class", "model_names"]
