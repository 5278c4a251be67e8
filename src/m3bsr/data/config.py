"""Typed configuration of ``m3bsr prepare`` (one tree, stored in the manifest, settable with ``--set``).

A preset (``data/presets/<name>.yaml``) is a plain YAML file of this tree; ``--config FILE`` is the
same shape; ``--set key=value`` overrides single keys. Unknown keys are errors.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from m3bsr.config import StrictModel, _known_keys, parse_override, parse_yaml, read_yaml, set_dotted
from m3bsr.errors import input_error

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ColumnsConfig(StrictModel):
    """Names of the event-log columns in the source file (after the reader has flattened it)."""

    user: str = "user"
    item: str = "item"
    behavior: str | None = Field("behavior", description="null when behaviors come from `rating`")
    timestamp: str = "timestamp"
    rating: str | None = Field(None, description="rating column; needs events.rating_behaviors")


class RatingRange(StrictModel):
    """Ratings in ``[min, max]`` (inclusive; null = unbounded) become ``behavior``."""

    behavior: str
    min: float | None = None
    max: float | None = None


class EventsConfig(StrictModel):
    """Where the event log is and how to read it."""

    path: str = Field("events.csv.gz", description="file inside the SOURCE folder (ignored when SOURCE is a file)")
    format: Literal["auto", "csv", "parquet", "jsonl", "otto", "recbole"] = "auto"
    delimiter: str | None = Field(None, description="CSV delimiter; null = ',' (tab for .tsv/.inter)")
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    ignore_columns: list[str] = Field(default_factory=list, description="extra source columns to drop silently")
    rating_behaviors: list[RatingRange] = Field(default_factory=list,
                                                description="rating ranges → behavior; ratings outside are dropped")
    rename: dict[str, str] = Field(default_factory=dict, description="source behavior name → name used here")
    integer_ids: bool = Field(False, description="require user/item ids to be integers")
    behavior: str | None = Field(None, description="single-behavior log without a behavior column: every row is "
                                 "this behavior (and, when `behaviors` is not given, the target)")

    @model_validator(mode="after")
    def _one_behavior_source(self) -> "EventsConfig":
        if self.behavior is None:
            return self
        if not self.behavior.strip():
            raise ValueError("events.behavior is an empty name")
        if self.columns.rating is not None or self.rating_behaviors:
            raise ValueError("events.behavior names the behavior of every row; it cannot be combined with "
                             "events.columns.rating / events.rating_behaviors")
        if "behavior" in self.columns.model_fields_set and self.columns.behavior is not None:
            raise ValueError(f"events.behavior={self.behavior!r} says the log has no behavior column, but "
                             f"events.columns.behavior={self.columns.behavior!r} names one; set only one of them")
        if self.columns.behavior is not None:  # stored as null, so the saved config reads back the same
            self.columns = self.columns.model_copy(update={"behavior": None})
        return self


class ItemsConfig(StrictModel):
    """Optional item table: side ids, text and image path carried into items.parquet."""

    path: str = Field(..., description="CSV/Parquet/JSONL file inside the SOURCE folder")
    format: Literal["auto", "csv", "parquet", "jsonl"] = "auto"
    delimiter: str | None = None
    id_column: str = "item"
    side: list[str] = Field(default_factory=list, description="columns → dense side ids (side_<name>, 0 = unknown)")
    text: list[str] = Field(default_factory=list, description="columns joined into the `text` column")
    labels: list[str] = Field(default_factory=list, description="columns carried as text into `label_<name>` "
                              "(e.g. genres, for `m3bsr experiment tsne`); no model reads them")
    image: str | None = Field(None, description="image path pattern inside SOURCE, e.g. posters/{item}.jpg")


class BehaviorsConfig(StrictModel):
    """Which behavior is predicted and which form the auxiliary stream."""

    target: str
    auxiliary: list[str] = Field(default_factory=list, description="merged into one auxiliary stream; empty = a "
                                 "single-behavior dataset (no auxiliary stream)")
    ignore: list[str] = Field(default_factory=list, description="behaviors present in the log and dropped")


class SyntheticConfig(StrictModel):
    """Knobs of the embedded generator (:mod:`m3bsr.data.synthetic`)."""

    users: int = Field(800, ge=2)
    items: int = Field(400, ge=10)
    categories: int = Field(10, ge=2)
    events_min: int = Field(20, ge=5, description="events per user, drawn uniformly in [events_min, events_max]")
    events_max: int = Field(40, ge=5)
    favor_rate: float = Field(0.3, gt=0, lt=1, description="share of events that are favors")
    accidental_click_rate: float = Field(0.25, ge=0, le=1, description="clicks unrelated to taste")
    drift: float = Field(0.05, ge=0, le=1, description="per-event probability that the current taste moves")
    dim: int = Field(32, ge=2, description="width of the image and text vectors")
    image_noise: float = Field(1.0, ge=0, description="std of the image modality noise (category signal has std 1)")
    text_noise: float = Field(1.0, ge=0, description="std of the text modality noise")
    sticker_rate: float = Field(0.2, ge=0, le=1, description="share of items with the nuisance 'price sticker'")
    sticker_strength: float = Field(2.0, ge=0, description="norm of the sticker direction in image/text vectors")
    sticker_click_boost: float = Field(4.0, ge=1, description="how much more accidental clicks hit stickered items")

    @model_validator(mode="after")
    def _range(self) -> "SyntheticConfig":
        if self.events_max < self.events_min:
            raise ValueError("events_max must be >= events_min")
        return self


class PrepareConfig(StrictModel):
    """The whole prepare pipeline: read → filter → remap → order → split → candidates."""

    name: str = Field("dataset", description="dataset name recorded in the manifest")
    cut: str = Field("", description="the data cut, in words, recorded in the manifest")
    events: EventsConfig = Field(default_factory=EventsConfig)
    items: ItemsConfig | None = None
    features: dict[str, str] = Field(default_factory=dict, description="modality → feature file (.parquet/.npy/"
                                     ".safetensors), keyed by original item id")
    behaviors: BehaviorsConfig
    min_user_events: int = Field(5, ge=1, description="drop users with fewer kept events (before keep_last)")
    keep_last: int = Field(50, ge=0, description="most recent events kept per stream and user; 0 = all")
    min_target_events: int = Field(2, ge=2, description="drop users with fewer target events (valid + test)")
    n_negatives: int = Field(99, ge=1, description="sampled negatives per valid/test target")
    seed: int = Field(0, description="draws the user sample and the candidates")
    sample_users: int | None = Field(None, ge=1, description="keep this many users, drawn uniformly from the "
                                     "raw log's users before any filter or cut (so at most this many remain); "
                                     "null = every user")
    on_bad_rows: Literal["error", "report", "drop"] = Field(
        "error", description="rows with a bad value: error (fail, listing them), report (list them all, write "
        "nothing) or drop (drop them, counted in the manifest); --on-bad-rows")
    synthetic: SyntheticConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _single_behavior_target(cls, raw: object) -> object:
        """``events.behavior`` alone names the target of a single-behavior log."""
        if not isinstance(raw, dict) or "behaviors" in raw:
            return raw
        events = raw.get("events")
        name = events.get("behavior") if isinstance(events, dict) else None
        return {**raw, "behaviors": {"target": name}} if isinstance(name, str) else raw

    @model_validator(mode="after")
    def _behaviors_distinct(self) -> "PrepareConfig":
        b = self.behaviors
        names = [b.target, *b.auxiliary, *b.ignore]
        if len(set(names)) != len(names):
            raise ValueError("target, auxiliary and ignore behaviors must be distinct")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def preset_names() -> list[str]:
    """Names of the built-in presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str, flag: str = "--preset") -> Path:
    """The YAML file of the built-in preset ``name``; an unknown name is a one-line error naming ``flag``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        close = difflib.get_close_matches(name, preset_names(), n=1)
        hint = f"Did you mean {close[0]}?" if close else f"Choose one of: {', '.join(preset_names())}"
        raise input_error(f"{flag} {name}", "unknown preset", hint)
    return path


def preset_summaries() -> list[str]:
    """One line per built-in preset: name, behaviors, and the first line of its file's header comment."""
    lines = []
    for name in preset_names():
        path = preset_path(name)
        text = path.read_text()
        raw = parse_yaml(text, str(path)) or {}
        b = raw.get("behaviors") or {}
        about = next((ln.lstrip("# ").strip() for ln in text.splitlines() if ln.startswith("#")), "")
        behaviors = f"{b.get('target')} <- {'+'.join(b.get('auxiliary') or []) or '(none)'}"
        lines.append(f"{name:<14} {behaviors:<24} {about.split(' (')[0]}")
    return [f"{'preset':<14} {'target <- auxiliary':<24} source", *lines]


def load_prepare_config(preset: str | None = None, config: str | Path | None = None,
                        overrides: list[str] = ()) -> PrepareConfig:
    """Preset YAML, then ``--config`` YAML (merged on top), then ``--set`` overrides → :class:`PrepareConfig`."""
    raw: dict[str, Any] = {}
    source = []
    if preset is not None:
        raw = read_yaml(preset_path(preset), f"preset {preset}")
        source.append(f"preset {preset}")
    if config is not None:
        _deep_merge(raw, read_yaml(config))
        source.append(str(config))
    for text in overrides:
        path_, value = parse_override(text)
        set_dotted(raw, path_, value)
    if overrides:
        source.append("--set")
    where = " + ".join(source) or "prepare config"
    try:
        return PrepareConfig.model_validate(raw)
    except ValidationError as e:
        # An unknown key first: a misspelt `behaviours:` also leaves `behaviors` missing, but the typo is the cause.
        errors = e.errors()
        first = next((err for err in errors if err["type"] == "extra_forbidden"), errors[0])
        key = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            leaves = _known_keys(PrepareConfig)
            sections = {".".join(leaf.split(".")[:i]) for leaf in leaves  # e.g. behaviors, events.columns
                        for i in range(1, leaf.count(".") + 1)}
            close = difflib.get_close_matches(key, sorted(set(leaves) | sections), n=1)
            hint = f"Did you mean {close[0]}?" if close else "See docs/data.md for the keys"
            raise input_error(where, f"unknown prepare key {key!r}", hint) from None
        if first["type"] == "missing":
            raise input_error(where, f"prepare key {key!r} is required",
                              "Use --preset NAME or set it in --config / --set") from None
        raise input_error(where, f"prepare key {key!r}: {first['msg']} (got {first.get('input')!r})",
                          "Fix the value") from None


def _deep_merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = v
