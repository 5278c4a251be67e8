"""An estimator-style Python API over the same engine as the command line::

    from m3bsr import Estimator

    est = Estimator("sasrec", prepare={"behaviors": {"target": "buy", "auxiliary": ["click"]}},
                    train__max_epochs=20, model__hidden_size=64).fit(events_df)
    est.recommend("u42", k=10, exclude_seen=True)   # [Recommendation(item, score), ...], original ids
    est.recommend_many(["u1", "u2"], k=10)         # DataFrame user, rank, item, score
    est.evaluate()                                  # {"valid": {p: M}, "test": {p: M}}, both protocols
    est.save("models/sasrec"); Estimator.load("models/sasrec")

``fit`` writes the DataFrame to ``WORKDIR/events.csv``, prepares it (``WORKDIR/data``, the prepare pipeline
of docs/data.md, rebuilt only when the events or the prepare settings change), trains with
:func:`m3bsr.engine.train.train` (``WORKDIR/run``, replaced on each fit) and loads the best checkpoint
into a :class:`~m3bsr.serving.recommend.Recommender`. Without ``workdir`` a temporary directory is used
and removed with the estimator.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from m3bsr import atomic
from m3bsr.config import Config, build_config, read_yaml, set_dotted
from m3bsr.errors import input_error
from m3bsr.serving.recommend import Recommendation, Recommender

EVENT_COLUMNS = ("user", "item", "timestamp")
SINGLE_BEHAVIOR = "interaction"
"""The behavior name of a DataFrame without a ``behavior`` column (every row is one kind of event)."""


def _settings_raw(config: dict[str, Any] | None, settings: dict[str, Any]) -> dict[str, Any]:
    """A nested config dict: ``config`` plus keyword settings, ``__`` standing for the dot of a dotted key
    (``train__lr=1e-3`` is ``train.lr``)."""
    raw: dict[str, Any] = copy.deepcopy(config or {})
    for key, value in settings.items():
        set_dotted(raw, key.split("__"), value)
    return raw


def _prepare_raw(events: pd.DataFrame, prepare: dict[str, Any] | None) -> dict[str, Any]:
    """The prepare config for ``events``: ``prepare`` (docs/data.md keys), with a single behavior named
    :data:`SINGLE_BEHAVIOR` when the DataFrame has no ``behavior`` column and no behavior is configured."""
    raw = copy.deepcopy(prepare or {})
    events_raw = raw.setdefault("events", {})
    names = {c: (events_raw.get("columns") or {}).get(c, c) for c in (*EVENT_COLUMNS, "behavior")}
    missing = [names[c] for c in EVENT_COLUMNS if names[c] not in events.columns]
    if missing:
        raise input_error(f"events DataFrame column(s) {', '.join(missing)}", "missing",
                          f"Pass a DataFrame with columns {', '.join(EVENT_COLUMNS)} (and behavior for a "
                          "multi-behavior log), or name yours in prepare={'events': {'columns': {...}}}")
    if names["behavior"] not in events.columns:
        if "behaviors" not in raw and "behavior" not in events_raw:
            events_raw["behavior"] = SINGLE_BEHAVIOR
    elif "behaviors" not in raw:
        found = sorted(map(str, events[names["behavior"]].dropna().unique()))
        raise input_error("Estimator(prepare=...)", f"the events have behaviors {', '.join(found[:5])} but no "
                          "target behavior is named", "Pass e.g. prepare={'behaviors': {'target': "
                          f"'{found[-1] if found else 'buy'}', 'auxiliary': [...]}}")
    return raw


def _prepare_frame(events: pd.DataFrame, prepare: dict[str, Any] | None, work: Path, out: Path,
                   quiet: bool) -> None:
    """Prepare ``events`` into ``out`` (the prepare pipeline takes the DataFrame as its source); the
    prepare config is kept in ``work/prepare.yaml`` for the record."""
    from m3bsr.data.config import load_prepare_config
    from m3bsr.data.prepare import prepare as run_prepare

    config_file = work / "prepare.yaml"
    atomic.write_yaml(config_file, _prepare_raw(events, prepare))
    cfg = load_prepare_config(config=config_file)
    run_prepare(events, cfg, out, overwrite=True, log=(lambda message: None) if quiet else print)


class Estimator:
    """A recommender model to ``fit`` on an events DataFrame and query with original ids.

    ``model``: a registered model name (``m3bsr``, ``pop``, ``gru4rec``, ``sasrec``, ``bert4rec``,
    ``mbstr``, ``mmsasrec``). ``config``: a run config dict (the sections of docs/config.md); keyword
    ``settings`` override single keys, ``__`` for the dot (``train__max_epochs=20``,
    ``model__hidden_size=64``, ``seed=1``). ``prepare``: prepare keys (docs/data.md), e.g.
    ``{"behaviors": {"target": "buy", "auxiliary": ["click"]}, "min_user_events": 3}``; a DataFrame
    without a ``behavior`` column is a single-behavior log. A bad key is an
    :class:`~m3bsr.errors.InputError` at once, naming it.
    """

    def __init__(self, model: str = "m3bsr", *, config: dict[str, Any] | None = None,
                 prepare: dict[str, Any] | None = None, quiet: bool = True, **settings: Any):
        self.config: Config = build_config(_settings_raw(config, settings), model=model, source="Estimator")
        self.prepare = prepare
        self.quiet = quiet
        self.metrics_: dict[str, Any] | None = None
        self.run_dir_: Path | None = None
        self.dataset_dir_: Path | None = None
        self._rec: Recommender | None = None

    # ------------------------------------------------------------------------------- fitting
    def fit(self, events: pd.DataFrame, workdir: str | Path | None = None) -> "Estimator":
        """Prepare ``events`` (columns user, item, timestamp and, for several behaviors, behavior), train,
        and load the best checkpoint. ``workdir`` keeps data and run (default: a temporary directory
        removed with the estimator). Returns ``self``; ``metrics_`` holds the run's metrics.json."""
        from m3bsr.engine.train import train

        if workdir is None:
            work = Path(tempfile.mkdtemp(prefix="m3bsr-"))
            weakref.finalize(self, shutil.rmtree, work, True)
        else:
            work = Path(workdir)
            work.mkdir(parents=True, exist_ok=True)
        self.dataset_dir_, self.run_dir_ = work / "data", work / "run"
        _prepare_frame(events, self.prepare, work, self.dataset_dir_, self.quiet)
        self.metrics_ = train(self.config, self.dataset_dir_, self.run_dir_, overwrite=True, quiet=self.quiet)
        self._rec = Recommender.from_run(self.run_dir_)
        return self

    @property
    def recommender(self) -> Recommender:
        """The loaded :class:`~m3bsr.serving.recommend.Recommender` (after ``fit`` or ``load``)."""
        if self._rec is None:
            raise input_error("Estimator", "not fitted", "Call .fit(events) or Estimator.load(path) first")
        return self._rec

    # ------------------------------------------------------------------------------- queries
    def recommend(self, user: Any, k: int = 10, exclude_seen: bool = False) -> list[Recommendation]:
        """Top-``k`` items (original ids, best first) for one known user (original id)."""
        return self.recommender.recommend_users([user], k, exclude_seen)[0]

    def recommend_many(self, users: Iterable[Any], k: int = 10, exclude_seen: bool = False) -> pd.DataFrame:
        """Top-``k`` for many users in a few forward passes: a DataFrame ``user, rank, item, score``."""
        users = [str(u) for u in users]
        results = self.recommender.recommend_users(users, k, exclude_seen)
        rows = [(u, r, x.item, x.score) for u, recs in zip(users, results) for r, x in enumerate(recs, start=1)]
        return pd.DataFrame(rows, columns=["user", "rank", "item", "score"])

    def evaluate(self) -> dict[str, dict[str, dict[str, float]]]:
        """Valid and test metrics of both protocols (``{"valid": {"sampled": M, "full": M}, "test": ...}``) of
        the loaded model on its prepared data: after ``fit``, the metrics.json numbers again."""
        from m3bsr.engine.evaluate import evaluate

        rec = self.recommender
        cfg = rec.cfg
        return {split: evaluate(rec.model, rec.builder.eval_windows(split, cfg.eval.exclude), cfg.eval,
                                cfg.train.eval_batch_size, rec.device)[0] for split in ("valid", "test")}

    # ------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Copy the run and its prepared data to ``path`` (``run/``, ``data/``; atomic). ``path/run`` is an
        ordinary run directory: ``m3bsr recommend``, ``export``, ``serve`` and ``evaluate`` accept it."""
        self.recommender  # noqa: B018 - not fitted: the one-line error
        path = Path(path)
        if path.exists() and not overwrite:
            raise input_error(str(path), "already exists", "Pass overwrite=True or choose another path")
        with atomic.atomic_dir(path, overwrite=overwrite) as tmp:
            shutil.copytree(self.dataset_dir_, tmp / "data")
            shutil.copytree(self.run_dir_, tmp / "run")
            config = tmp / "run" / "config.yaml"
            raw = read_yaml(config)
            raw["dataset"] = str((path / "data").resolve())  # the copy, where it will be after the rename
            atomic.write_yaml(config, raw)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Estimator":
        """An estimator saved with :meth:`save` (``path/data`` is used even if the folder was moved since)."""
        from m3bsr.engine.checkpoint import load_run_model
        from m3bsr.engine.runs import RunDir

        path = Path(path)
        run = RunDir(path / "run")
        model, cfg, ds = load_run_model(run.root, dataset=path / "data")
        est = cls(cfg.model.name, config=cfg.to_dict())
        est.run_dir_, est.dataset_dir_ = run.root, path / "data"
        est.metrics_ = run.read_summary() if run.metrics_json.is_file() else None
        est._rec = Recommender(model, cfg, ds)
        return est
