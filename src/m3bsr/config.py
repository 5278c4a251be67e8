"""Typed run configuration: one tree, saved with every run, settable with dotted ``--set`` keys.

Sections: ``seed``, ``data`` (context window), ``model`` (the typed config of the chosen model,
one class per model in :mod:`m3bsr.models.configs`, registered in :mod:`m3bsr.models.registry`),
``train`` and ``eval``.
Unknown keys and values of the wrong type are :class:`~m3bsr.errors.InputError` with one line
naming the key and the fix.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError

from m3bsr.errors import InputError, input_error


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(StrictModel):
    """How prepared data is cut into model inputs."""

    max_len: int = Field(50, ge=1, description="context window: most recent events per behavior sequence")


class BaseModelConfig(StrictModel):
    """Fields every model shares. Each model subclasses it with ``name: Literal["<name>"]``."""

    name: str
    hidden_size: int = Field(64, ge=1)
    n_layers: int = Field(2, ge=0)
    n_heads: int = Field(2, ge=1)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)


class TrainConfig(StrictModel):
    """The training loop (engine)."""

    max_epochs: int = Field(200, ge=1)
    patience: int = Field(10, ge=1, description="epochs without valid improvement before stopping (paper: 10)")
    batch_size: int = Field(256, ge=1, description="user windows per step")
    eval_batch_size: int = Field(1024, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(5.0, ge=0, description="max global grad norm; 0 disables")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU)")
    compile: bool = Field(False, description="torch.compile the model")
    monitor_protocol: Literal["sampled", "full"] = "full"
    monitor_metric: str = "NDCG@10"
    nonfinite: Literal["stop", "skip"] = Field("stop", description="on a NaN/inf loss: stop the run or skip the batch")
    log_every: int = Field(0, ge=0, description="steps between log lines in --quiet mode; 0 = once per epoch")
    eval_test: bool = Field(True, description="evaluate test once on the best checkpoint (sweeps set false)")
    loss: Literal["full", "sampled"] = Field(
        "full", description="full = softmax cross-entropy over the whole catalogue (Eq. 23-24); sampled = "
        "each positive against train.loss_negatives shared negatives, logQ-corrected (docs/training.md)")
    loss_negatives: int = Field(1024, ge=1, description="train.loss=sampled: negatives drawn per batch, "
                                "shared by its queries")
    loss_alpha: float = Field(1.0, ge=0.0, description="train.loss=sampled: negatives drawn with probability "
                              "proportional to (training target count + 1)^alpha; 0 = uniform")
    loss_replacement: bool = Field(True, description="train.loss=sampled: draw with replacement; false = "
                                   "distinct items (at most the catalogue)")
    loss_chunk_scores: int | None = Field(
        None, ge=1, description="train.loss=full: compute the catalogue cross-entropy in chunks of at most this many "
        "query x item scores, recomputing each chunk's scores in backward instead of keeping all of them: bounds the "
        "loss's memory, and on CPU with a large catalogue and batch is faster (4194304: 1.23-1.26x per step on all "
        "of tmall at batch 256, 0.70x at batch 64, 0.92x on ml100k_mm; docs/training.md); null = one pass")
    bucket_by_length: int = Field(
        0, ge=0, description="0 = plain shuffled batches (the paper's setting); K > 0 = batches of similar-length "
        "windows, sorted within pools of K batches, with their padding trimmed: faster on logs of mixed lengths, the "
        "same model, but other batches and dropout draws, so numbers differ from K = 0 (2-4 % lower NDCG@10 on all "
        "of tmall; docs/training.md)")
    low_memory: bool = Field(
        False, description="give freed blocks of 256 KB or more back to the system at once (glibc's malloc, "
        "Linux): the peak follows the live tensors (200 users x 300 items: 479 instead of ~630 MB) but steps "
        "are slower (here 1.9x a whole run); process-wide; same numbers (docs/training.md \"Memory\")")
    log_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="also log every epoch's losses and metrics to TensorBoard and/or MLflow "
        "(files under the run directory; pip install 'm3bsr[tracking]')")


class EvalConfig(StrictModel):
    """Evaluation protocols (docs/training.md "Evaluation protocols")."""

    exclude: Literal["target", "none", "all"] = Field(
        "target", description="full ranking: mask items of the user's target history (positive never masked)"
    )
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    item_chunk: int = Field(1024, ge=1, description="items scored per chunk in full ranking (bounds memory; "
                            "~1k keeps the batch x chunk scores in cache)")
    max_tokens: int | None = Field(8192, ge=1, description="an evaluation batch holds at most this many windows x "
                                   "longest window (null: always train.eval_batch_size windows); speed only")


class Config(StrictModel):
    """A whole run."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: SerializeAsAny[BaseModelConfig]
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(),
                              revalidate_instances="never")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON-safe), including every model field."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- reading YAML


def _yaml_error(e: yaml.YAMLError, where: str, fix: str) -> InputError:
    """A parse error as one line: ``where:LINE: not valid YAML (problem). fix``."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None)
    if problem and isinstance(e, yaml.constructor.ConstructorError):
        problem += "; Python tags are never loaded"
    return input_error(f"{where}:{mark.line + 1}" if mark else where,
                       f"not valid YAML ({problem})" if problem else "not valid YAML", fix)


def parse_yaml(text: str, where: str, fix: str = "Fix the syntax") -> Any:
    """``text`` parsed with the safe loader (Python tags such as ``!!python/object`` are refused, never
    run); a syntax error is one :class:`InputError` line naming ``where:LINE`` and ``fix``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise _yaml_error(e, where, fix) from None


def read_yaml(path: str | Path, where: str | None = None, *, fix: str | None = None, mapping: bool = True) -> Any:
    """The YAML file ``path`` (safe loader, see :func:`parse_yaml`): every YAML file m3bsr reads goes
    through here. One-line :class:`InputError` naming ``where`` (default: the path) when the file is
    missing or unreadable, ``where:LINE`` when it is not valid YAML (``fix``: how to repair it). ``mapping``:
    the file must hold a mapping of sections (an empty file reads as ``{}``); anything else is an error."""
    where = str(path) if where is None else where
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise input_error(where, "file not found", "Check the path") from None
    except OSError as e:
        raise input_error(where, f"cannot read the file ({e.strerror})", "Check the path") from None
    except UnicodeDecodeError:
        raise input_error(where, "not a text file", "Pass a YAML file") from None
    loaded = parse_yaml(text, where, fix or "Fix the syntax")
    if mapping:
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise input_error(where, "not a mapping of config sections",
                              fix or "Write it as sections of KEY: VALUE lines")
    return loaded


# --------------------------------------------------------------------------- building and overrides


def _known_keys(cfg_cls: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in cfg_cls.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def known_keys(model_name: str) -> list[str]:
    """Every dotted key settable for a run of ``model_name``."""
    from m3bsr.models.registry import model_config_class

    keys = [k for k in _known_keys(Config) if not k.startswith("model")]
    keys += [f"model.{k}" for k in _known_keys(model_config_class(model_name))]
    return sorted(keys)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` → ``(["train", "lr"], 0.001)``; values are parsed as YAML scalars."""
    if "=" not in text:
        raise input_error(f"--set {text!r}", "expected KEY=VALUE", "Write e.g. --set train.lr=0.001")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise input_error(f"--set {text!r}", "empty key", "Write e.g. --set train.lr=0.001")
    try:
        parsed = parse_yaml(value, "--set") if value.strip() else ""
    except InputError:
        parsed = value
    if isinstance(parsed, str):
        # YAML reads "1e-3" as a string; accept scientific notation for numbers.
        try:
            parsed = float(parsed) if any(c in parsed for c in ".eE") else int(parsed)
        except ValueError:
            pass
    return key.split("."), parsed


def set_dotted(raw: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, creating sections as needed."""
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part, {}), dict):
            raise input_error(f"key {'.'.join(path)}", f"{part} is a value, not a section")
        node = node.setdefault(part, {})
    node[path[-1]] = value


def models_with_key(key: str) -> list[str]:
    """Registered models whose runs accept the dotted ``key`` (e.g. ``model.no_meie`` → ``["m3bsr"]``)."""
    from m3bsr.models.registry import model_names

    return [name for name in model_names() if key in known_keys(name)]


def _explain(err: ValidationError, model_name: str, source: str, prefix: str = "") -> InputError:
    first = err.errors()[0]
    key = prefix + ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        owners = models_with_key(key)
        if owners:
            which = (f"model {owners[0]} has it; drop it or pass --model {owners[0]}" if len(owners) == 1 else
                     f"models {', '.join(owners)} have it; drop it or pass --model with one of them")
            return input_error(source, f"config key {key!r} does not apply to model {model_name!r}", f"Only {which}")
        close = difflib.get_close_matches(key, known_keys(model_name), n=1)
        hint = f"Did you mean {close[0]}?" if close else "See docs/config.md for the config keys."
        return input_error(source, f"unknown config key {key!r}", hint)
    return input_error(source, f"config key {key!r}: {first['msg']} (got {first.get('input')!r})",
                       "Fix the value")


def build_config(raw: dict[str, Any] | None = None, *, model: str | None = None,
                 overrides: list[str] = (), source: str = "config") -> Config:
    """Validate a nested dict (e.g. from YAML) plus ``--set`` overrides into a :class:`Config`.

    ``model`` (a registered model name) takes precedence over ``raw['model']['name']``.
    Raises :class:`InputError` naming the first bad key.
    """
    from m3bsr.models.registry import canonical_name, model_config_class

    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise input_error(source, "the config must be a mapping of sections", "See docs/config.md")
    model_raw = raw.setdefault("model", {})
    if not isinstance(model_raw, dict):
        raise input_error(source, "'model' must be a section", "Write model: {name: m3bsr, ...}")
    if model is not None:
        model_raw["name"] = model
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(raw, path, value)
    name = canonical_name(raw["model"].get("name", "m3bsr"))  # any case: SASRec → sasrec
    raw["model"]["name"] = name
    cfg_cls = model_config_class(name)
    try:
        model_cfg = cfg_cls.model_validate(raw["model"])
    except ValidationError as e:
        raise _explain(e, name, source, prefix="model.") from None
    try:
        return Config.model_validate({**{k: v for k, v in raw.items() if k != "model"}, "model": model_cfg})
    except ValidationError as e:
        raise _explain(e, name, source) from None


def load_config(path: str | Path | None, *, model: str | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML config file (safe loader) and apply ``--set`` overrides; ``path=None`` uses defaults."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        raw = read_yaml(path)
    return build_config(raw, model=model, overrides=overrides, source=source if not overrides else
                        f"{source} + --set")
