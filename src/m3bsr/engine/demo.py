"""``m3bsr demo``: prepare the embedded synthetic dataset, train M3BSR and popularity, compare.

Everything goes under ``OUT`` (default ``runs/demo``): ``OUT/data`` (the prepared dataset, reused
when up to date), ``OUT/m3bsr`` and ``OUT/pop`` (run directories, replaced on each demo) and
``OUT/compare.yaml`` (the demo's settings as a ``m3bsr compare --config`` file). The demo config
caps epochs and patience so the whole demo takes about two minutes on two CPU cores. The output
ends with the table (within 100 columns) and the next commands, with the demo's paths.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

from m3bsr import atomic
from m3bsr.config import Config, build_config, load_config, parse_override, read_yaml, set_dotted

DEMO_MODELS = ("m3bsr", "pop")
# Applied before the user's --config/--set: small enough for ~2 min on 2 cores, large enough to learn
# (measured: M3BSR full NDCG@10 0.17 vs popularity 0.05 after 3 epochs on the synthetic preset).
DEMO_SETS = ["train.max_epochs=3", "train.patience=2", "train.batch_size=128", "train.lr=0.003",
             "data.max_len=20"]
DEMO_MODEL_SETS = {"m3bsr": ["model.hidden_size=32", "model.n_layers=1"]}
TABLE_METRICS = ("HR@10", "NDCG@10", "HR@20", "NDCG@20", "MRR")


def demo_config(model: str, config: str | Path | None, overrides: list[str]) -> Config:
    """The demo's config for ``model``: demo defaults, then ``--config``, then ``--set``.

    ``model.*`` keys of the user apply to M3BSR only (popularity has none).
    """
    user = [o for o in overrides if model == "m3bsr" or not o.startswith("model.")]
    sets = DEMO_SETS + DEMO_MODEL_SETS.get(model, []) + user
    if config is None:
        return build_config({}, model=model, overrides=sets, source="demo config")
    raw = load_config(config, model=model).to_dict()
    if model != "m3bsr":
        raw["model"] = {"name": model}
    return build_config(raw, model=model, overrides=sets, source=str(config))


def comparison_table(results: dict[str, dict], split: str = "test") -> str:
    """Two rows per model (sampled and full protocol), one column per metric; within 100 columns."""
    width = max(len(m) for m in TABLE_METRICS + ("0.0000",))
    name_width = max(len("model"), *(len(m) for m in results))
    head = (f"{'model':<{name_width}}  {'protocol':<8}  " + "  ".join(f"{m:>{width}}" for m in TABLE_METRICS)
            + "  s/epoch")
    lines = [f"{split} metrics (sampled: positive + stored negatives; full: whole catalogue, history masked)",
             head, "-" * len(head)]
    for model, summary in results.items():
        for k, protocol in enumerate(("sampled", "full")):
            vals = "  ".join(f"{summary[split][protocol][m]:>{width}.4f}" for m in TABLE_METRICS)
            per_epoch = f"  {summary['seconds_per_epoch']:>7.2f}" if k == 0 else ""
            lines.append(f"{model if k == 0 else '':<{name_width}}  {protocol:<8}  {vals}{per_epoch}")
    return "\n".join(lines)


def compare_config(config: str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The demo's settings as a ``m3bsr compare --config`` mapping: ``--config``, then the demo's sets,
    then ``--set`` (as :func:`demo_config` applies them). Compare gives each ``model.*`` key to the
    listed models that have it, so every model shares M3BSR's demo hidden size, as it shares the
    epochs, batch size and window."""
    raw: dict[str, Any] = read_yaml(config) if config is not None else {}
    (raw.get("model") or {}).pop("name", None)
    raw.pop("seed", None)
    for text in DEMO_SETS + DEMO_MODEL_SETS["m3bsr"] + list(overrides):
        path, value = parse_override(text)
        if path != ["seed"]:  # compare sets the seed of each run (--seeds)
            set_dotted(raw, path, value)
    return raw


def next_steps(out: Path, user: str) -> str:
    """What to run after the demo, with its paths: recommend for ``user``, serve, compare."""
    q = lambda p: shlex.quote(str(p))  # noqa: E731
    run = q(out / "m3bsr")
    return "\n".join([
        "Next steps:",
        f"  # top-10 items for user {user} (original ids), items the user has seen left out",
        f"  m3bsr recommend {run} --user {shlex.quote(user)} --k 10 --exclude-seen",
        f"  # an HTTP service on 127.0.0.1:8000: POST {{\"user_id\": \"{user}\", \"k\": 10}} to /recommend",
        f"  m3bsr serve {run}",
        "  # pop vs SASRec vs M3BSR on 3 seeds with the demo's settings: mean ± std, significance",
        f"  m3bsr compare --dataset {q(out / 'data')} --models pop,sasrec,m3bsr --seeds 0,1,2 \\",
        f"      --config {q(out / 'compare.yaml')} --out {q(out / 'compare')}",
    ])


def run_demo(out: Path, *, config: str | Path | None = None, overrides: list[str] = (),
             quiet: bool = False, prepare_sets: list[str] = ()) -> dict[str, dict]:
    """Prepare (cached) → train each of :data:`DEMO_MODELS` → print the comparison; returns the summaries.

    ``prepare_sets`` override keys of the synthetic preset (e.g. ``synthetic.users=200``; tests use it).
    """
    from m3bsr.data.config import load_prepare_config
    from m3bsr.data.prepare import prepare
    from m3bsr.engine.train import train

    out = Path(out)
    t0 = time.perf_counter()
    log = (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr))
    data = out / "data"
    prepare("synthetic", load_prepare_config("synthetic", overrides=list(prepare_sets)), data, log=log)
    results = {}
    for model in DEMO_MODELS:
        cfg = demo_config(model, config, list(overrides))
        print(f"== training {model} ==", file=sys.stderr)
        results[model] = train(cfg, data, out / model, overwrite=True, quiet=quiet)
    atomic.write_yaml(out / "compare.yaml", compare_config(config, list(overrides)))
    import pandas as pd

    user = str(pd.read_parquet(data / "users.parquet", columns=["original"])["original"].iloc[0])
    print()
    print(comparison_table(results))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s; runs in {out}/ (metrics.json, curves.png, ...)\n")
    print(next_steps(out, user))
    return results
