"""Model registry: name → model class (imported lazily, so each model lives in its own module) and
name → config class (:mod:`m3bsr.models.configs`, torch-free: a config validates without torch).

Names are matched case-insensitively (``--model SASRec`` is ``sasrec``); configs store the registered spelling."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from m3bsr.config import BaseModelConfig
from m3bsr.errors import input_error
from m3bsr.models import configs

if TYPE_CHECKING:  # m3bsr.batch imports torch; name checks (canonical_name) need none
    from m3bsr.batch import Catalogue

_MODELS: dict[str, str] = {
    "m3bsr": "m3bsr.models.m3bsr:M3BSR",
    "pop": "m3bsr.models.pop:Pop",
    "gru4rec": "m3bsr.models.gru4rec:GRU4Rec",
    "sasrec": "m3bsr.models.sasrec:SASRec",
    "bert4rec": "m3bsr.models.bert4rec:BERT4Rec",
    "mbstr": "m3bsr.models.mbstr:MBSTR",
    "mmsasrec": "m3bsr.models.mmsasrec:MMSASRec",
}
_CONFIGS: dict[str, type[BaseModelConfig]] = {
    "m3bsr": configs.M3BSRConfig,
    "pop": configs.PopConfig,
    "gru4rec": configs.GRU4RecConfig,
    "sasrec": configs.SASRecConfig,
    "bert4rec": configs.BERT4RecConfig,
    "mbstr": configs.MBSTRConfig,
    "mmsasrec": configs.MMSASRecConfig,
}
"""Each model's config class; the model class names the same one as its ``config_class``."""


def model_names() -> list[str]:
    """Registered model names."""
    return list(_MODELS)


def canonical_name(name: str) -> str:
    """The registered spelling of model ``name``, matched case-insensitively (``SASRec`` → ``sasrec``)."""
    if name in _MODELS:
        return name
    by_lower = {registered.lower(): registered for registered in _MODELS}
    key = str(name).strip().lower()
    if key not in by_lower:
        raise input_error(f"model {name!r}", "unknown model", f"Choose one of: {', '.join(_MODELS)}")
    return by_lower[key]


def model_class(name: str) -> type:
    """The model class registered as ``name`` (any letter case)."""
    module, cls = _MODELS[canonical_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def model_config_class(name: str) -> type[BaseModelConfig]:
    """The typed config class of model ``name`` (any letter case); imports no torch."""
    return _CONFIGS[canonical_name(name)]


def build_model(cfg: BaseModelConfig, catalogue: Catalogue):
    """Instantiate the model named by ``cfg.name`` for ``catalogue``; an :class:`InputError` when the
    model cannot run on that dataset (its ``data_mode``, e.g. M3BSR's paper preset without an auxiliary
    behavior)."""
    cls = model_class(cfg.name)
    cls.data_mode(cfg, catalogue)
    return cls(cfg, catalogue)
