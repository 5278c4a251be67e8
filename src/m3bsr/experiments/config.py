"""Typed settings of ``m3bsr experiment``: one section per experiment, set with ``--set NAME.KEY=VALUE``
or a ``NAME:`` section of ``--config`` (the other sections of that file are the runs' config).

Models are *entries*: a ``m3bsr compare`` entry (``MODEL`` or ``MODEL@PRESET``) plus any model keys
joined by ``+``, e.g. ``m3bsr@paper+no_cdmd_m=true`` (a key without a dot is a ``model.`` key).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError

from m3bsr.config import StrictModel, parse_override, set_dotted
from m3bsr.errors import input_error

PAPER_ABLATIONS = ["no_cdmd_m", "no_cdmd_b", "no_meie", "no_shared_expert", "no_disentangle"]
NOISE_MODELS = ["m3bsr", "m3bsr@paper", "m3bsr@paper+no_cdmd_m=true", "m3bsr@paper+no_cdmd_b=true", "sasrec",
                "mbstr", "mmsasrec"]


class AblationSettings(StrictModel):
    """The full model and one run per switch (paper Figure 3)."""

    base: str = Field("m3bsr@paper", description="the full model; the paper's switches need the paper preset "
                      "(no_meie needs common_expert=cross)")
    switches: list[str] = Field(default_factory=lambda: list(PAPER_ABLATIONS),
                                description="boolean model keys set true, one run each")
    variants: list[str] = Field(default_factory=list, description="more entries' model keys, e.g. "
                                "'fusion=gate' or 'denoise_output=none+T_m=5', each added to the base")


class NoiseSettings(StrictModel):
    """Levels of each noise kind (data/noise.py); level 0 is the clean data, run once."""

    models: list[str] = Field(default_factory=lambda: list(NOISE_MODELS))
    kinds: list[Literal["clicks", "features", "swap"]] = Field(default_factory=lambda: ["clicks", "features", "swap"])
    clicks: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5, 1.0],
                                description="accidental clicks added, as a share of each user's auxiliary events")
    features: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 1.0],
                                  description="Gaussian noise sigma, relative to each feature column's std")
    swap: list[float] = Field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5],
                              description="share of items whose feature rows are swapped with another item's")
    seed: int = Field(0, description="seed of the noise draws (the same noisy data for every model and run seed)")


COMPARE_MODELS = ["pop", "gru4rec", "sasrec", "bert4rec", "mbstr", "mmsasrec", "m3bsr", "m3bsr@paper"]


class ColdstartSettings(StrictModel):
    """Cold users: at most ``max_train`` training interactions (events before the user's valid target)."""

    models: list[str] = Field(default_factory=lambda: list(COMPARE_MODELS))
    max_train: int = Field(10, ge=0, description="cold users: at most this many training interactions")
    count: Literal["all", "target"] = Field("all", description="count events of both streams, or target events only")
    runs: str | None = Field(None, description="a `m3bsr compare --out` directory whose runs/ are reused "
                             "(default: OUT/runs)")


class CostSettings(StrictModel):
    models: list[str] = Field(default_factory=lambda: list(COMPARE_MODELS))
    runs: str | None = Field(None, description="a `m3bsr compare --out` directory whose runs/ are reused")
    predictions: int = Field(50, ge=1, description="single-user top-10 predictions timed per model")
    steps: int = Field(3, ge=1, description="training steps measured for the peak memory")


class SensitivitySettings(StrictModel):
    """2-D grids on validation; ``grids`` maps a name to two axes written as ``m3bsr sweep --grid``:
    ``"model.KEY=V1,V2,... model.KEY=V1,V2,..."`` (a key without a dot is a model key)."""

    model: str = "m3bsr@paper"
    grids: dict[str, str] = Field(default_factory=lambda: {
        "T_b x lambda_b": "model.T_b=5,10,15 model.lambda_b=0.01,0.02,0.04",
        "T_m x lambda_m": "model.T_m=5,10,15 model.lambda_m=0.01,0.02,0.04",
        "tau x lambda_c": "model.tau=0.1,0.3,0.5 model.lambda_c=0.025,0.05,0.1"})
    metric: str = "NDCG@10"
    protocol: Literal["sampled", "full"] = "full"
    spread: float = Field(0.016, ge=0, description="the claim: (max - min) / max of each grid at most this")


class TsneSettings(StrictModel):
    """Item representations before and after CDMD-M and after an MLP in its place (paper Figure 5)."""

    base: str = Field("m3bsr@paper", description="the model with CDMD-M (`--models` overrides it); the MLP entry "
                      "is it plus modality_denoiser=mlp. CDMD-M needs the specific experts (paper preset)")
    category: str = Field("category", description="the item label column `label_<category>` that colours the "
                          "items (prepare with items.labels=[COLUMN]; synthetic stores `category`)")
    separator: str = Field("|", description="a label holding several values (genres 'A|B') counts as its first")
    modality: str | None = Field(None, description="one content modality; None = all of them, concatenated")
    max_items: int = Field(2000, ge=10, description="at most this many items (a seeded sample) are scored and drawn")
    k: int = Field(10, ge=1, description="neighbours of the kNN category accuracy")
    perplexity: float = Field(30.0, gt=0, description="t-SNE perplexity (lowered to (items - 1) / 3 for few items)")


class ExperimentSettings(StrictModel):
    ablation: AblationSettings = Field(default_factory=AblationSettings)
    noise: NoiseSettings = Field(default_factory=NoiseSettings)
    coldstart: ColdstartSettings = Field(default_factory=ColdstartSettings)
    cost: CostSettings = Field(default_factory=CostSettings)
    sensitivity: SensitivitySettings = Field(default_factory=SensitivitySettings)
    tsne: TsneSettings = Field(default_factory=TsneSettings)


SECTIONS = tuple(ExperimentSettings.model_fields)

STARTS = {"ablation": "base", "coldstart": "models", "cost": "models", "noise": "models", "sensitivity": "model",
          "tsne": "base"}
"""Experiment → its setting that names the entries it starts from (``--models`` replaces them)."""


def split_settings(raw: dict[str, Any], sets: list[str], source: str = "config"
                   ) -> tuple[ExperimentSettings, dict[str, Any], list[str]]:
    """``--config`` dict and ``--set`` texts → (experiment settings, the runs' raw config, the runs' --set texts):
    sections named after an experiment go to the settings, everything else to the runs."""
    mine = {k: v for k, v in raw.items() if k in SECTIONS}
    runs_raw = {k: v for k, v in raw.items() if k not in SECTIONS}
    run_sets = []
    for text in sets:
        path, value = parse_override(text)
        if path[0] in SECTIONS:
            set_dotted(mine, path, value)
        else:
            run_sets.append(text)
    try:
        return ExperimentSettings.model_validate(mine), runs_raw, run_sets
    except ValidationError as e:
        first = e.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise input_error(f"{source} / --set {key}", first["msg"], "See docs/experiments.md for the keys") from None
