"""Optional experiment tracking (``train.log_to``): every epoch's losses, valid metrics and timing, and
the final test metrics, to TensorBoard and/or MLflow, besides metrics.jsonl (always written).

Both write files under the run directory and talk to no server:

* ``tensorboard``: ``RUN/tensorboard/`` event files (``torch.utils.tensorboard.SummaryWriter``); view
  with ``tensorboard --logdir RUN/tensorboard``.
* ``mlflow``: a local MLflow file store ``RUN/mlruns/`` (experiment ``m3bsr``, one MLflow run per run
  directory, tagged ``m3bsr.run_dir``; a resumed run logs into the same MLflow run); view with
  ``mlflow ui --backend-store-uri RUN/mlruns``. ``MLFLOW_TRACKING_URI``, when set, is used instead
  (a database or a server of your own).

Scalar names (:func:`scalars`): ``loss/<term>`` (``loss/total`` is their sum), ``valid/<protocol>/<metric>``,
``test/<protocol>/<metric>`` (logged once, at the best epoch), ``time/seconds``, ``time/eval_seconds``,
``time/targets_per_second``, ``train/skipped_batches``; the step is the epoch. MLflow forbids ``@`` in
names, so there ``NDCG@10`` is ``NDCG_at_10``. The libraries come with ``pip install 'm3bsr[tracking]'``;
without them a run that asks for one stops before any work with a one-line error.
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path
from typing import Any

from m3bsr.errors import input_error

INSTALL = "pip install 'm3bsr[tracking]'"
MLFLOW_EXPERIMENT = "m3bsr"
RUN_TAG = "m3bsr.run_dir"
_MODULES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # log_to value -> module that must import


def check_available(log_to: list[str]) -> None:
    """One-line :class:`~m3bsr.errors.InputError` when a library that ``log_to`` names is not installed."""
    for name in dict.fromkeys(log_to):
        if importlib.util.find_spec(_MODULES[name]) is None:
            raise input_error(f"train.log_to={name}", f"the {name} package is not installed",
                              f"Install it with {INSTALL}, or drop {name} from train.log_to")


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A metrics.jsonl record (or a metrics.json summary) → ``{name: value}`` of its numbers.

    ``loss`` → ``loss/<term>``; ``valid``/``test`` → ``<split>/<protocol>/<metric>``; timing →
    ``time/...``; ``skipped_batches`` → ``train/skipped_batches``. Other keys are left out."""
    out: dict[str, float] = {}
    for term, value in (record.get("loss") or {}).items():
        out[f"loss/{term}"] = float(value)
    for split in ("valid", "test"):
        for protocol, metrics in (record.get(split) or {}).items():
            for metric, value in metrics.items():
                out[f"{split}/{protocol}/{metric}"] = float(value)
    for key in ("seconds", "eval_seconds", "targets_per_second"):
        if key in record:
            out[f"time/{key}"] = float(record[key])
    if "skipped_batches" in record:
        out["train/skipped_batches"] = float(record["skipped_batches"])
    return {f"{prefix}{k}": v for k, v in out.items()}


def flat_params(cfg: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config dict → ``{dotted key: value as text}`` (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = str(value)
    return out


class Tracker:
    """Where epoch records go besides metrics.jsonl. This base logs nowhere (``train.log_to=[]``)."""

    def log_epoch(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record (after it is written), at step ``record["epoch"]``."""

    def log_summary(self, summary: dict[str, Any]) -> None:
        """The final metrics.json: its test metrics, at step ``summary["best_epoch"]``."""

    def close(self, status: str = "FINISHED") -> None:
        """Flush and release (``status``: ``FINISHED``, ``KILLED`` on Ctrl-C, ``FAILED`` on an error)."""


class TensorBoardTracker(Tracker):
    """Scalars to ``root/tensorboard`` (a resumed run adds an event file; TensorBoard reads them all)."""

    def __init__(self, root: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(root) / "tensorboard"))

    def _write(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # each epoch is on disk before the next starts

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._write(scalars(record), int(record["epoch"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._write(scalars({"test": summary.get("test") or {}}), int(summary["best_epoch"]))

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class MLflowTracker(Tracker):
    """Metrics (and, on creation, the config as params) to one MLflow run of experiment ``m3bsr``."""

    def __init__(self, root: Path, config: dict[str, Any]):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            # MLflow 3 keeps the file store in maintenance mode behind this opt-in; a local store under
            # the run directory needs no server or database.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(root) / "mlruns").resolve().as_uri()
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(MLFLOW_EXPERIMENT)
        exp_id = (experiment.experiment_id if experiment is not None
                  else self.client.create_experiment(MLFLOW_EXPERIMENT))
        tag = str(Path(root).resolve())
        found = self.client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{tag}'", max_results=1)
        if found:  # a resumed run: the same MLflow run, its params already logged
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(exp_id, run_name=Path(root).name, tags={RUN_TAG: tag})
            self.run_id = run.info.run_id
            from mlflow.entities import Param

            self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in flat_params(config).items()])

    def _write(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name.replace("@", "_at_"), value, now, step) for name, value in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._write(scalars(record), int(record["epoch"]))

    def log_summary(self, summary: dict[str, Any]) -> None:
        self._write(scalars({"test": summary.get("test") or {}}), int(summary["best_epoch"]))

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class Trackers(Tracker):
    """Every tracker of ``train.log_to`` (each library once, in the order given)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_epoch(self, record: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_epoch(record)

    def log_summary(self, summary: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_summary(summary)

    def close(self, status: str = "FINISHED") -> None:
        for t in self.trackers:
            t.close(status)


def open_trackers(log_to: list[str], root: Path, config: dict[str, Any]) -> Tracker:
    """The trackers ``log_to`` names for the run directory ``root`` (``config``: the run's config dict)."""
    check_available(log_to)
    made: list[Tracker] = []
    for name in dict.fromkeys(log_to):
        made.append(TensorBoardTracker(root) if name == "tensorboard" else MLflowTracker(root, config))
    return Trackers(made)
