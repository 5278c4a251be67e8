"""The typed config of every model (``model.*`` keys): pydantic only, no torch.

Kept apart from the model modules, which import torch (seconds and ~300 MB), so that validating a
run's config (unknown keys with their "did you mean" hint, another model's key, presets such as
``model.preset=paper``, every range and cross-key check) answers before torch is imported: the
registry (:mod:`m3bsr.models.registry`) maps each model name to its class here, and each model
module imports its config from here (as its ``config_class``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from m3bsr.config import BaseModelConfig

CDMD_M_KEYS = ("no_cdmd_m", "modality_denoiser", "T_m", "lambda_m")
"""M3BSR keys read only by CDMD-M (or the MLP in its place), which needs content features: on data without
them these change nothing (:meth:`M3BSRConfig.inert_keys`)."""

InputMode = Literal["merged", "target"]
"""What a single-stream baseline reads: both behavior streams merged by time, or the target stream only."""


# --------------------------------------------------------------------------- M3BSR (models/m3bsr.py)

PRESETS: dict[str, dict[str, object]] = {
    # The printed architecture (docs/model.md "presets"), with only the initialisation defect fixed.
    "paper": dict(id_input="mlp16", feature_norm="none", item_content=False, content_gate=False, scorer="linear",
                  common_expert="cross", fusion="gate", repeat=False, no_specific_experts=False,
                  no_cdmd_b=False, no_disentangle=False, aux_targets=0.0),
    # The best design measured on validation (docs/results.md "ladder"); every entry is its own key.
    "default": dict(id_input="full", feature_norm="standardize", item_content=True, content_gate=False, scorer="tied",
                    common_expert="merged", fusion="residual", repeat=True, no_specific_experts=True,
                    no_cdmd_b=False, no_disentangle=False, aux_targets=0.5),
}
"""Preset name → the values it gives the keys a run does not set itself."""

ADDED_KEYS: dict[str, dict[str, object]] = {
    "m3bsr": {"aux_targets": 0.0},  # added 2026-12-01 with the default preset's 0.5
}
"""Model name → keys added after runs were saved, each with the value that gives the behavior of a run
whose config.yaml predates it; a preset's newer value must not change what an old run was."""


def with_added_keys(raw: dict[str, object]) -> dict[str, object]:
    """A stored run config dict with every :data:`ADDED_KEYS` entry its ``model`` section lacks."""
    model = raw.get("model")
    if not isinstance(model, dict) or str(model.get("name", "")).lower() not in ADDED_KEYS:
        return raw
    return {**raw, "model": {**ADDED_KEYS[str(model["name"]).lower()], **model}}


class M3BSRConfig(BaseModelConfig):
    """Every FLAG and DECIDED choice of docs/model.md, the five ablations of Figure 3, and the
    departures of the ``default`` preset (each a key of its own, so a ladder can toggle it).

    ``preset`` fills every key of :data:`PRESETS` that the run does not set explicitly; the saved
    config holds the resolved values, so a run reads the same whatever the presets become.
    """

    name: Literal["m3bsr"] = "m3bsr"
    preset: Literal["paper", "default"] = Field("default", description="paper = the printed architecture; "
                                                "default = backbone + gated paper branches (docs/model.md)")
    id_input: Literal["mlp16", "full"] = Field("full", description="mlp16 = id_dim table + MLP (Eq. 3-4); "
                                               "full = one hidden_size-wide id table")
    feature_norm: Literal["none", "standardize"] = Field(
        "standardize", description="content features: as given, or z-scored per dimension over the catalogue "
        "with the projection initialised at the id table's scale")
    item_content: bool = Field(True, description="content projections join the item vector used as input "
                               "(merged backbone) and, with the tied scorer, for scoring")
    content_gate: bool = Field(False, description="with item_content: the content part of the item vector is "
                               "scaled by a learned [d] gate that starts at zero (the model starts id-only)")
    common_expert: Literal["cross", "merged"] = Field(
        "merged", description="cross = Eq. 16-17 (click queries, favor keys, read at the latest click); "
        "merged = causal Transformer over both streams by time, read at the latest event (the backbone)")
    repeat: bool = Field(True, description="repeat head: a learned logit bonus for the user's own history items")
    aux_targets: float = Field(0.5, ge=0, description="weight of an extra cross-entropy at every auxiliary "
                               "event: its item from the events strictly before it (0 = off, the paper's loss)")
    no_specific_experts: bool = Field(True, description="drop the specific experts (and the denoisers that feed "
                                      "them): the merged backbone alone")
    id_dim: int = Field(16, ge=1, description="item id embedding width before the MLP (paper: 16)")
    side_dim: int = Field(16, ge=1, description="width of each side-id table (brand, seller...)")
    max_positions: int = Field(200, ge=1, description="size of the position tables (>= data.max_len)")
    modality_denoiser: Literal["diffusion", "mlp"] = Field(
        "diffusion", description="CDMD-M (Eq. 6-10), or a plain 2-layer MLP in its place trained by the main "
        "loss only (the paper's Figure 5 comparison)")
    T_m: int = Field(10, ge=1, description="diffusion steps of CDMD-M")
    T_b: int = Field(10, ge=1, description="diffusion steps of CDMD-B")
    infer_steps: int | None = Field(None, ge=1, description="K: reverse steps / x0 step; None = each T")
    beta_start: float = Field(1e-3, gt=0, lt=1)
    beta_end: float = Field(1e-1, gt=0, lt=1)
    diffusion_loss: Literal["eps", "literal"] = "eps"
    denoise_output: Literal["reverse_chain", "x0", "none"] = "x0"
    contrast: Literal["disentangle", "literal"] = "disentangle"
    fusion: Literal["gate", "router", "residual"] = Field(
        "residual", description="Eq. 21-22: gate, router, or residual = common + zero-initialised gate x W_s s")
    scorer: Literal["linear", "tied"] = Field("tied", description="linear = Eq. 23; tied = item vectors + bias")
    share_specific_experts: bool = True
    lambda_c: float = Field(0.05, ge=0)
    lambda_m: float = Field(0.02, ge=0)
    lambda_b: float = Field(0.02, ge=0)
    tau: float = Field(0.3, gt=0)
    no_cdmd_m: bool = False
    no_cdmd_b: bool = False
    no_meie: bool = False
    no_shared_expert: bool = False
    no_disentangle: bool = False
    length_buckets: int = Field(4, ge=1, description="MEIE runs windows in up to this many groups of similar "
                                "length, each trimmed to its longest window (speed only; 1 = one group)")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: object) -> object:
        if not isinstance(raw, dict):
            return raw
        preset = raw.get("preset", "default")
        if preset not in PRESETS:
            return raw  # the Literal check names the allowed presets
        return {**PRESETS[preset], **raw}

    @model_validator(mode="after")
    def _check(self) -> "M3BSRConfig":
        if self.no_specific_experts and (self.common_expert != "merged" or self.no_shared_expert):
            raise ValueError("no_specific_experts needs common_expert=merged and the shared expert (the backbone "
                             "is then the whole model)")
        if self.no_meie and self.common_expert == "merged":
            raise ValueError("no_meie is the paper's ablation (common_expert=cross); with common_expert=merged "
                             "set no_specific_experts=true")
        if self.modality_denoiser == "mlp" and self.no_cdmd_m:
            raise ValueError("modality_denoiser=mlp puts an MLP in CDMD-M's place and no_cdmd_m removes that "
                             "place; set only one of them")
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start {self.beta_start} > beta_end {self.beta_end}")
        if self.infer_steps is not None and self.infer_steps > min(self.T_m, self.T_b):
            raise ValueError(f"infer_steps {self.infer_steps} exceeds min(T_m, T_b) = {min(self.T_m, self.T_b)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        return self

    def inert_keys(self, content: bool) -> dict[str, str]:
        """The keys of the paper's parts that change nothing here, each with why: this configuration does
        not build the part that reads them (models/m3bsr.py), e.g. ``T_b`` without CDMD-B, ``tau``
        without MEIE's disentanglement loss. ``content``: whether the data has content features (CDMD-M
        needs them). An experiment that varies only these keys would train this model again."""
        cdmd_b, contrast = ("T_b", "lambda_b"), ("tau", "lambda_c", "contrast")
        if self.no_specific_experts:  # the backbone alone: no denoiser, no MEIE
            return dict.fromkeys(CDMD_M_KEYS + cdmd_b + contrast + (
                "no_cdmd_b", "no_disentangle", "infer_steps", "beta_start", "beta_end", "diffusion_loss",
                "denoise_output"), "no_specific_experts=true builds none of the paper's parts")
        inert: dict[str, str] = {}
        if not content:
            inert |= dict.fromkeys(CDMD_M_KEYS, "no content features, so no CDMD-M")
        elif self.no_cdmd_m or self.modality_denoiser == "mlp":
            inert |= dict.fromkeys(("T_m", "lambda_m"), "no_cdmd_m=true" if self.no_cdmd_m else
                                   "modality_denoiser=mlp has no diffusion and no loss of its own")
        if self.no_cdmd_b:
            inert |= dict.fromkeys(cdmd_b, "no_cdmd_b=true")
        if self.no_meie or self.no_disentangle:
            inert |= dict.fromkeys(contrast, "no_meie=true" if self.no_meie else "no_disentangle=true")
        return inert


# --------------------------------------------------------------------------- baselines


class PopConfig(BaseModelConfig):
    """Popularity has no hyper-parameters of its own."""

    name: Literal["pop"] = "pop"


class GRU4RecConfig(BaseModelConfig):
    """GRU4Rec hyper-parameters (``n_heads`` is unused)."""

    name: Literal["gru4rec"] = "gru4rec"
    n_layers: int = Field(1, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    input: InputMode = Field("merged", description="merged = aux + target events by time; target = target only")


class SASRecConfig(BaseModelConfig):
    """SASRec hyper-parameters (paper defaults; hidden size shared with every model)."""

    name: Literal["sasrec"] = "sasrec"
    n_layers: int = Field(2, ge=0)
    n_heads: int = Field(1, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    input: InputMode = Field("merged", description="merged = aux + target events by time; target = target only")
    loss: Literal["ce", "bce"] = Field("ce", description="ce = full softmax; bce = paper's one sampled negative")
    max_positions: int = Field(512, ge=1, description="learned positions; >= merged window length (2 x data.max_len)")
    aux_targets: float = Field(0.0, ge=0, description="weight of an extra cross-entropy at every auxiliary "
                               "event: its item from the events strictly before it (0 = off, SASRec's loss)")

    @model_validator(mode="after")
    def _check(self) -> "SASRecConfig":
        if self.aux_targets > 0 and (self.loss != "ce" or self.input != "merged"):
            raise ValueError("aux_targets predicts auxiliary events from the merged stream with the full "
                             "softmax; it needs input=merged and loss=ce")
        return self


class BERT4RecConfig(BaseModelConfig):
    """BERT4Rec hyper-parameters (paper defaults; hidden size shared with every model)."""

    name: Literal["bert4rec"] = "bert4rec"
    n_layers: int = Field(2, ge=0)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    mask_prob: float = Field(0.2, gt=0.0, le=1.0, description="cloze mask proportion rho")
    mask_scope: Literal["target", "all"] = Field("target", description="which tokens the cloze task may mask")
    input: InputMode = Field("merged", description="merged = aux + target events by time; target = target only")
    max_positions: int = Field(512, ge=2, description="learned positions; >= merged window length + 1")


class MBSTRConfig(BaseModelConfig):
    """MB-STR hyper-parameters (hidden size shared with every model)."""

    name: Literal["mbstr"] = "mbstr"
    n_layers: int = Field(2, ge=0)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    n_experts: int = Field(3, ge=1, description="shared experts of the behavior-aware prediction")
    n_buckets: int = Field(32, ge=2, description="relative-distance buckets of the attention bias")
    max_distance: int = Field(128, ge=2, description="distance mapped to the last bucket")
    aux_weight: float = Field(1.0, ge=0.0, description="weight of next-item loss on auxiliary behaviors")


class MMSASRecConfig(SASRecConfig):
    """SASRec's hyper-parameters plus the modalities to fuse."""

    name: Literal["mmsasrec"] = "mmsasrec"  # type: ignore[assignment]
    modalities: list[str] | None = Field(None, description="modalities to fuse; null = every one the dataset has")
