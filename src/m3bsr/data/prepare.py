"""``m3bsr prepare``: event log → filter → remap → order → split → candidates → prepared dir (atomic).

Pipeline (the paper's protocol, see docs/data.md):

1. read the event log (any reader, or a pandas DataFrame) and check behaviors (target present, no
   unknown names); rows with a bad value fail, are reported or are dropped (``on_bad_rows``); with
   ``sample_users`` keep that many of the raw log's users, drawn uniformly (before any filter or cut);
2. keep the target and auxiliary behaviors (auxiliaries merge into one stream; none = a
   single-behavior dataset, whose auxiliary stream is empty);
3. drop users with fewer than ``min_user_events`` kept events;
4. per user and stream keep the ``keep_last`` most recent events (order: timestamp, then input order,
   so of two events with one timestamp the later row of the input counts as later);
5. drop users with fewer than ``min_target_events`` target events (each needs a valid and a test target);
6. dense ids 1..U / 1..I over what is kept (0 = padding); ``order`` = per-user rank, 0-based;
7. leave-one-out on the target stream: last → test, second-to-last → valid;
8. per valid/test target: the positive then ``n_negatives`` items drawn uniformly without replacement
   from the catalogue items the user never touched in the whole input log (any behavior).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from m3bsr import checks
from m3bsr.atomic import atomic_dir
from m3bsr.data.bad_rows import BAD_ROWS_REPORTED, BadRows
from m3bsr.data.config import PrepareConfig, SyntheticConfig, load_prepare_config, preset_path, preset_summaries
from m3bsr.data.features import align_features, features_from_array, read_feature_file
from m3bsr.data.readers import build_item_table, read_events, read_items, to_event_table
from m3bsr.data.stats import compute_statistics, format_statistics, tie_statistics
from m3bsr.errors import input_error

PREPARE_VERSION = 1
"""Bumped when the pipeline's output or prepared.SCHEMA_VERSION changes, so caches are rebuilt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve(base: Path, rel: str) -> Path:
    """A configured path: absolute, else inside the SOURCE folder, else relative to the working dir."""
    p = Path(rel).expanduser()
    if p.is_absolute():
        return p
    return base / p if (base / p).exists() or not p.exists() else p


def _natural_order(ids: np.ndarray) -> np.ndarray:
    """Sorted unique ids: numerically when every id is an integer, else as text."""
    uniq = pd.unique(ids)
    s = pd.Series(uniq, dtype="string")
    if len(s) and s.str.fullmatch(r"[+-]?\d+").all():
        return uniq[np.argsort(s.astype(np.int64).to_numpy(), kind="stable")]
    return np.sort(uniq.astype(str)).astype(object)


def _frame_sha256(frame: pd.DataFrame) -> str:
    """sha256 of a DataFrame's column names, dtypes and values in row order (not its index)."""
    h = hashlib.sha256(json.dumps([[str(c), str(t)] for c, t in frame.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _unknown_behaviors(events: pd.DataFrame, cfg: PrepareConfig, bad: BadRows) -> None:
    """Rows whose behavior is in none of target/auxiliary/ignore → ``bad`` (by their data row)."""
    b = cfg.behaviors
    known = {b.target, *b.auxiliary, *b.ignore}
    beh = events["behavior"]
    unknown = (beh.notna() & ~beh.isin(known)).to_numpy()
    bad.add(events["row"].to_numpy()[unknown], cfg.events.columns.behavior or "", "unknown behaviors",
            f"The known behaviors are {', '.join(sorted(known))}: map it with events.rename or list it in "
            "behaviors.ignore", template="unknown behavior {!r}", values=beh.to_numpy()[unknown])


def _check_target(events: pd.DataFrame, cfg: PrepareConfig, where: str) -> None:
    b = cfg.behaviors
    beh = events["behavior"]
    if not (beh == b.target).any():
        present = ", ".join(sorted(str(x) for x in beh.dropna().unique()))
        raise input_error(where, f"target behavior {b.target!r} does not occur (present: {present})",
                          "Set behaviors.target to one of the present behaviors")


def _filter_and_order(events: pd.DataFrame, cfg: PrepareConfig, counts: dict[str, int]) -> pd.DataFrame:
    """Steps 2-5: kept behaviors, user filters and the per-stream cut, sorted by (user, time, input row)."""
    b = cfg.behaviors
    kept = events[events["behavior"].isin([b.target, *b.auxiliary])].copy()
    counts["events_other_behaviors_dropped"] = int(len(events) - len(kept))
    kept["stream"] = (kept["behavior"] == b.target).astype(np.int8)
    n_per_user = kept.groupby("user", sort=False)["item"].transform("size")
    small = n_per_user < cfg.min_user_events
    counts["users_dropped_min_user_events"] = int(kept.loc[small, "user"].nunique())
    kept = kept[~small]
    kept = kept.sort_values(["user", "timestamp", "row"], kind="stable")
    if cfg.keep_last > 0:
        from_end = kept.groupby(["user", "stream"], sort=False).cumcount(ascending=False)
        counts["events_dropped_keep_last"] = int((from_end >= cfg.keep_last).sum())
        kept = kept[from_end.to_numpy() < cfg.keep_last]
    n_target = kept.groupby("user", sort=False)["stream"].transform("sum")
    few = n_target < cfg.min_target_events
    counts["users_dropped_min_target_events"] = int(kept.loc[few, "user"].nunique())
    kept = kept[~few]
    if kept.empty:
        raise input_error("prepare", f"no user left after filtering (min_user_events={cfg.min_user_events}, "
                          f"min_target_events={cfg.min_target_events}, target={b.target!r}; "
                          f"{counts['users_dropped_min_user_events']} users below min_user_events, "
                          f"{counts['users_dropped_min_target_events']} below min_target_events)",
                          "Lower the thresholds with --set or check the behaviors")
    return kept


def _remap(kept: pd.DataFrame, cfg: PrepareConfig) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, list[str]]:
    """Step 6: dense user/item ids (1-based), per-user ``order`` rank and behavior indexes.

    Returns the events sorted by (user, order), original user ids [U], original item ids [I] and
    the behavior names (auxiliaries, then the target).
    """
    user_orig, item_orig = _natural_order(kept["user"].to_numpy()), _natural_order(kept["item"].to_numpy())
    kept = kept.assign(user=pd.Index(user_orig).get_indexer(kept["user"]) + 1,
                       item=pd.Index(item_orig).get_indexer(kept["item"]) + 1)
    kept = kept.sort_values(["user", "timestamp", "row"], kind="stable").reset_index(drop=True)
    kept["order"] = kept.groupby("user", sort=False).cumcount().astype(np.int64)
    names = [*cfg.behaviors.auxiliary, cfg.behaviors.target]
    kept["behavior"] = kept["behavior"].map({n: k for k, n in enumerate(names)}).astype(np.int8)
    return kept, user_orig, item_orig, names


def _sample_users(events: pd.DataFrame, cfg: PrepareConfig, counts: dict[str, int],
                  log: Callable[[str], None]) -> pd.DataFrame:
    """Step 1b: the events of ``cfg.sample_users`` users drawn uniformly without replacement from the
    raw log's users (in natural id order, so the draw does not depend on the row order), from
    ``numpy_rng(seed, "sample-users")``. Before any filter or cut: fewer may remain after them."""
    from m3bsr.seeding import numpy_rng

    users = _natural_order(events["user"].to_numpy())
    n = cfg.sample_users
    if n >= len(users):
        log(f"prepare: sample_users={n}: the log has only {len(users):,} users; all kept")
        counts.update(users_not_sampled=0, events_not_sampled=0)
        return events
    chosen = users[np.sort(numpy_rng(cfg.seed, "sample-users").choice(len(users), size=n, replace=False))]
    keep = events["user"].isin(chosen).to_numpy()
    counts.update(users_not_sampled=int(len(users) - n), events_not_sampled=int((~keep).sum()))
    log(f"prepare: sampled {n:,} of {len(users):,} users (seed {cfg.seed}), before any filter or cut: "
        f"{int(keep.sum()):,} events")
    return events[keep].reset_index(drop=True)


def _split(ev: pd.DataFrame, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (into ``ev``, sorted by user/order) of each user's valid and test target [U]."""
    tgt = np.flatnonzero(ev["stream"].to_numpy() == 1)
    users = ev["user"].to_numpy()[tgt]
    last = np.searchsorted(users, np.arange(1, n_users + 1), side="right") - 1  # last target row per user
    return tgt[last - 1], tgt[last]


def _seen_pairs(log: pd.DataFrame, user_index: pd.Index, item_index: pd.Index) -> tuple[np.ndarray, np.ndarray]:
    """Dense (user, item) pairs over the WHOLE input log (any behavior), for candidate exclusion."""
    u = user_index.get_indexer(log["user"])
    i = item_index.get_indexer(log["item"])
    ok = (u >= 0) & (i >= 0)
    return u[ok] + 1, i[ok] + 1


def _first_occurrence(draws: np.ndarray) -> np.ndarray:
    """[N, M] bool: True where the value has not appeared earlier in its row."""
    idx = np.argsort(draws, axis=1, kind="stable")
    srt = np.take_along_axis(draws, idx, axis=1)
    dup = np.zeros_like(draws, dtype=bool)
    dup_sorted = np.zeros_like(dup)
    dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
    np.put_along_axis(dup, idx, dup_sorted, axis=1)
    return ~dup


def sample_candidates(users: np.ndarray, positives: np.ndarray, seen_u: np.ndarray, seen_i: np.ndarray,
                      n_items: int, n_neg: int, rng: np.random.Generator, user_orig: np.ndarray) -> np.ndarray:
    """[N, 1 + n_neg] candidates: the positive, then ``n_neg`` distinct items the user never touched.

    Uniform without replacement by vectorised rejection: draw items with replacement, reject
    seen ones and repeats within the row, keep the first ``n_neg`` (= sequential sampling without
    replacement). Users who touched over 3/4 of the catalogue draw from their explicit unseen pool.
    """
    stride = n_items + 1
    seen_keys = np.unique(seen_u.astype(np.int64) * stride + seen_i)
    n_seen = np.bincount((seen_keys // stride).astype(np.int64), minlength=int(users.max()) + 1)[users]
    short = np.flatnonzero(n_items - n_seen < n_neg)
    if len(short):
        k = short[0]
        unseen = int(n_items - n_seen[k])
        raise input_error(f"user {str(user_orig[users[k] - 1])!r}", f"only {unseen} of the {n_items} catalogue "
                          f"items are unseen; n_negatives={n_neg} needs that many",
                          f"Lower n_negatives (e.g. --set n_negatives={unseen})" if unseen else
                          "This user touched every item; the sampled protocol needs a larger catalogue")
    out = np.zeros((len(users), n_neg), np.int64)
    dense = np.flatnonzero(n_items - n_seen < n_items // 4)
    for k in dense:  # few users; exact pool
        pool = np.setdiff1d(np.arange(1, n_items + 1), seen_keys[seen_keys // stride == users[k]] % stride)
        out[k] = rng.choice(pool, size=n_neg, replace=False)
    todo = np.setdiff1d(np.arange(len(users)), dense)
    width = n_neg + n_neg // 4 + 8  # enough for most users of a sparse log; the rest retry wider
    while len(todo):
        draws = rng.integers(1, n_items + 1, size=(len(todo), width))
        keys = users[todo, None].astype(np.int64) * stride + draws
        pos = np.searchsorted(seen_keys, keys).clip(max=len(seen_keys) - 1)
        ok = (seen_keys[pos] != keys) & _first_occurrence(draws)
        done = ok.sum(axis=1) >= n_neg
        take = ok[done] & (np.cumsum(ok[done], axis=1) <= n_neg)
        out[todo[done]] = draws[done][take].reshape(-1, n_neg)
        todo, width = todo[~done], width * 2
    return np.concatenate([positives[:, None].astype(np.int64), out], axis=1)


def _source_files(source: str | Path | pd.DataFrame, cfg: PrepareConfig) -> tuple[Path | None, Path, dict[str, Path]]:
    """(events file or None for synthetic and a DataFrame, base folder, {role: path} of every input file)."""
    if isinstance(source, pd.DataFrame):  # its item table and feature files are relative to the working dir
        files = {"items": _resolve(Path("."), cfg.items.path)} if cfg.items is not None else {}
        files.update({f"features.{m}": _resolve(Path("."), p) for m, p in cfg.features.items()})
        for role, p in files.items():
            if not p.is_file():
                raise input_error(str(p), f"{role} file not found", "Check the config's paths")
        return None, Path("."), files
    if str(source) == "synthetic":
        return None, Path("."), {f"features.{m}": _resolve(Path("."), p) for m, p in cfg.features.items()}
    src = Path(source)
    if not src.exists():
        raise input_error(str(src), "SOURCE not found", "Give an event file, a dataset folder or 'synthetic'")
    events_path = src if src.is_file() else src / cfg.events.path
    base = src.parent if src.is_file() else src
    files = {"events": events_path}
    if cfg.items is not None:
        files["items"] = _resolve(base, cfg.items.path)
    files.update({f"features.{m}": _resolve(base, p) for m, p in cfg.features.items()})
    for role, p in files.items():
        if not p.is_file():
            raise input_error(str(p), f"{role} file not found", "Check SOURCE and the preset's paths")
    return events_path, base, files


def _fingerprint(cfg: PrepareConfig, hashes: list[dict[str, Any]]) -> str:
    config = cfg.to_dict()
    if config["events"]["behavior"] is None:  # added later; unset, it leaves earlier caches up to date
        del config["events"]["behavior"]
    if config["sample_users"] is None:  # the same
        del config["sample_users"]
    if config["on_bad_rows"] == "error":  # the same; the other modes can change (report: skip) the output
        del config["on_bad_rows"]
    if config["items"] is not None and not config["items"]["labels"]:  # the same
        del config["items"]["labels"]
    blob = json.dumps({"prepare_version": PREPARE_VERSION,
                       "config": config, "files": [(h["role"], h["sha256"]) for h in hashes]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _bad_summary(bad: dict[str, BadRows]) -> dict[str, Any]:
    """``{"rows": total, "files": {role: {"file", "rows", "reasons": {reason: n}}}}`` of the files with bad rows."""
    files = {role: {"file": b.where, "rows": len(b), "reasons": b.counts()} for role, b in bad.items() if len(b)}
    return {"rows": sum(f["rows"] for f in files.values()), "files": files}


def _bad_report(bad: dict[str, BadRows]) -> dict[str, Any]:
    """What ``on_bad_rows=report`` returns: the summary and the first :data:`BAD_ROWS_REPORTED` bad rows."""
    lines: list[str] = []
    for b in bad.values():
        lines += b.lines(BAD_ROWS_REPORTED - len(lines))
    return {"on_bad_rows": "report", "written": False, "bad_rows": {**_bad_summary(bad), "listed": lines}}


def _handle(bad: BadRows, cfg: PrepareConfig) -> None:
    """``error``: fail on a bad row of this file now (``report``/``drop`` go on)."""
    if cfg.on_bad_rows == "error":
        bad.raise_if_any()


def _read_source(source: str | Path | pd.DataFrame, events_path: Path | None, cfg: PrepareConfig,
                 bad: dict[str, BadRows]) -> tuple[pd.DataFrame, str, dict[str, tuple[list[str], np.ndarray]],
                                                   dict[str, pd.Series]]:
    """Step 1: the event table of the good rows (column ``row`` = 0-based data row), where it came from,
    the synthetic features and item labels (``{name: Series by original item id}``: the generator's
    ``category``); bad rows of the log are added to ``bad["events"]``."""
    from m3bsr.data import synthetic as synth

    labels: dict[str, pd.Series] = {}
    if isinstance(source, pd.DataFrame):
        where = "DataFrame"
        if source.empty:
            raise input_error(where, "no rows", "Pass a DataFrame with one row per event")
        b = bad["events"] = BadRows(where)
        events, features = to_event_table(source.reset_index(drop=True), cfg.events, where, b), {}
    elif events_path is None:
        data = synth.generate(cfg.synthetic, cfg.seed)
        b = bad["events"] = BadRows("synthetic")
        events, where, features = data.events.reset_index(drop=True), "synthetic", data.features
        labels = {"category": pd.Series(data.items["category"].to_numpy(), index=data.items["item"].to_numpy())}
    else:
        where = str(events_path)
        b = bad["events"] = BadRows(where)
        events, features = read_events(events_path, cfg.events, b), {}
    events = events[~events.index.isin(b.rows())].copy()
    events["row"] = events.index.to_numpy().astype(np.int64)  # ties keep the input order
    _unknown_behaviors(events, cfg, b)
    _handle(b, cfg)
    return events[~events["row"].isin(b.rows())].reset_index(drop=True), where, features, labels


def up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of the prepared directory ``out`` with ``"up_to_date": True`` when it was built with
    ``fingerprint`` (same sources + config), else None (absent, unreadable or other data)."""
    try:
        manifest = json.loads((Path(out) / "manifest.json").read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return {**manifest, "up_to_date": True} if manifest.get("fingerprint") == fingerprint else None


def prepare(source: str | Path | pd.DataFrame, cfg: PrepareConfig | str, out: str | Path, overwrite: bool = False,
            log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
            overrides: list[str] = ()) -> dict[str, Any]:
    """Build the prepared directory ``out`` from ``source`` (a file, a folder, ``"synthetic"``, or a pandas
    DataFrame of events with the columns ``cfg.events.columns`` names; its row order is the input order).

    ``cfg`` is a :class:`PrepareConfig` or a preset name (then ``overrides`` are ``--set`` texts,
    e.g. ``["synthetic.users=300"]``). Returns the manifest. If ``out`` already holds the same sources + config, returns its manifest
    with ``"up_to_date": True`` without rebuilding; a different one needs ``overwrite``. With
    ``on_bad_rows="report"`` nothing is written and the bad rows are returned (``bad_rows``: ``rows``,
    per-file ``files`` counts per reason, the first ``listed``).
    """
    out = Path(out)
    if isinstance(cfg, str):
        cfg = load_prepare_config(cfg, None, list(overrides))
    elif overrides:
        raise TypeError("overrides apply to a preset name; edit the PrepareConfig instead")
    frame = isinstance(source, pd.DataFrame)
    if not frame and str(source) == "synthetic" and cfg.synthetic is None:
        cfg = cfg.model_copy(update={"synthetic": SyntheticConfig()})
    report = cfg.on_bad_rows == "report"
    events_path, base, files = _source_files(source, cfg)
    hashes = [{"role": r, "path": str(p.resolve()), "sha256": _sha256(p), "size": p.stat().st_size}
              for r, p in files.items()]
    if frame:
        hashes.insert(0, {"role": "events", "path": "DataFrame", "sha256": _frame_sha256(source),
                          "size": int(len(source))})
    fp = _fingerprint(cfg, hashes)
    if not report and (current := up_to_date(out, fp)) is not None:
        return current
    if out.exists() and not overwrite and not report:
        raise input_error(str(out), "exists and was prepared from other sources or another config",
                          "Pass --overwrite to replace it, or choose another --out")
    # Imported here so the "up to date" check above stays fast (these pull in torch).
    from m3bsr.data.prepared import EvalTargets, write_prepared
    from m3bsr.seeding import numpy_rng

    t0 = time.perf_counter()
    bad: dict[str, BadRows] = {}
    events, where, item_features, item_labels = _read_source(source, events_path, cfg, bad)
    if report:  # every input file's bad rows, and nothing else
        if cfg.items is not None and "items" in files:
            read_items(files["items"], cfg.items, cfg.events.integer_ids, bad.setdefault("items", BadRows(
                str(files["items"]))))
        for m in cfg.features:
            read_feature_file(files[f"features.{m}"], bad.setdefault(f"features.{m}", BadRows(
                str(files[f"features.{m}"]))))
        return _bad_report(bad)
    if events_path is None and not frame:
        log(f"prepare: generated {len(events):,} synthetic events")
    else:
        log(f"prepare: read {len(events):,} events from {events_path or 'a DataFrame'} "
            f"({time.perf_counter() - t0:.1f} s)")
    _check_target(events, cfg, where)
    counts = {"input_events": int(len(events)), "input_users": int(events["user"].nunique()),
              "input_items": int(events["item"].nunique()),
              "events_rating_unmapped_dropped": int(events["behavior"].isna().sum())}
    if cfg.sample_users is not None:
        events = _sample_users(events, cfg, counts, log)

    kept = _filter_and_order(events, cfg, counts)
    kept, user_orig, item_orig, names = _remap(kept, cfg)
    n_users, n_items = len(user_orig), len(item_orig)
    log(f"prepare: kept {len(kept):,} events, {n_users:,} users, {n_items:,} items"
        + ("" if cfg.behaviors.auxiliary else f" (single-behavior: {cfg.behaviors.target!r} only)"))

    valid_rows, test_rows = _split(kept, n_users)
    seen_u, seen_i = _seen_pairs(events, pd.Index(user_orig), pd.Index(item_orig))
    t1 = time.perf_counter()
    rows = np.concatenate([valid_rows, test_rows])
    cand = sample_candidates(kept["user"].to_numpy()[rows], kept["item"].to_numpy()[rows], seen_u, seen_i,
                             n_items, cfg.n_negatives, numpy_rng(cfg.seed, "candidates"), user_orig)
    log(f"prepare: sampled {cfg.n_negatives} negatives for {len(rows):,} targets ({time.perf_counter() - t1:.1f} s)")

    def targets(r: np.ndarray, c: np.ndarray) -> EvalTargets:
        return EvalTargets(user=kept["user"].to_numpy()[r], item=kept["item"].to_numpy()[r],
                           order=kept["order"].to_numpy()[r], candidates=c)

    valid, test = targets(valid_rows, cand[:n_users]), targets(test_rows, cand[n_users:])
    if "items" in files:
        bad["items"] = BadRows(str(files["items"]))
    items = build_item_table(item_orig, cfg.items, files.get("items"), base, cfg.events.integer_ids,
                             bad.get("items"))
    if "items" in bad:
        _handle(bad["items"], cfg)
    for name, values in item_labels.items():  # the synthetic generator's categories (no model reads them)
        items[f"label_{name}"] = pd.array(values.reindex(items["original"].to_numpy()).astype(str), dtype="string")
    features, masks, feature_info = {}, {}, {}
    for m, (ids, x) in item_features.items():
        features[m], masks[m] = features_from_array(ids, x, item_orig)
    for m in cfg.features:
        b = bad[f"features.{m}"] = BadRows(str(files[f"features.{m}"]))
        features[m], masks[m], feature_info[m] = align_features(files[f"features.{m}"], item_orig, b)
        _handle(b, cfg)
    if cfg.on_bad_rows == "drop":
        dropped = _bad_summary(bad)
        counts["bad_rows_dropped"] = dropped["rows"]
        for role, f in dropped["files"].items():
            log(f"prepare: dropped {f['rows']:,} bad rows of {f['file']}: "
                + ", ".join(f"{n:,} {reason}" for reason, n in f["reasons"].items()))
    users = pd.DataFrame({"user": np.arange(1, n_users + 1, dtype=np.int32), "original": user_orig.astype(str)})
    statistics = compute_statistics(kept, names, n_users, n_items, counts)
    ties = statistics["ties"]
    if ties["users_valid_test_tied_share"] >= 0.01:
        log(f"prepare: warning: {ties['users_valid_test_tied_share']:.1%} of users have their valid and test targets "
            "at the same timestamp; the input row order decides which is which (docs/data.md §5)")
    manifest = {
        "source": {"name": cfg.name, "path": "DataFrame" if frame else str(source) if events_path is None
                   else str(Path(source).resolve()), "files": hashes},
        "fingerprint": fp, "prepare_version": PREPARE_VERSION,
        "config": cfg.to_dict(),
        "behaviors": {"names": names, "target": cfg.behaviors.target, "auxiliary": list(cfg.behaviors.auxiliary)},
        "statistics": statistics,
        "feature_files": feature_info,
    }
    if cfg.on_bad_rows == "drop":
        manifest["bad_rows_dropped"] = dropped
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_prepared(tmp, manifest=manifest, events=kept, users=users, items=items, valid=valid, test=test,
                       features=features, feature_masks=masks)
    log(f"prepare: wrote {out} in {time.perf_counter() - t0:.1f} s")
    return json.loads((out / "manifest.json").read_text())


def inspect(path: str | Path) -> str:
    """The statistics table of a prepared directory (the tie statistics of a directory prepared before
    they were recorded are computed from its events.parquet)."""
    p = checks.prepared_dir(path) / "manifest.json"
    manifest = json.loads(p.read_text())
    stats = manifest.get("statistics", {})
    if "ties" not in stats and (Path(path) / "events.parquet").is_file():
        events = pd.read_parquet(Path(path) / "events.parquet", columns=["user", "timestamp", "stream", "order"])
        stats["ties"] = tie_statistics(events)
    return format_statistics(manifest)


def _print_report(bad: dict[str, Any]) -> int:
    """``--on-bad-rows report``: each listed bad row, what was left unlisted and the counts, on stdout;
    exit code 1 when any row is bad."""
    if not bad["rows"]:
        print("prepare: no bad rows (nothing written; prepare without --on-bad-rows report to write the dataset)")
        return 0
    for line in bad["listed"]:
        print(line)
    problems = sum(n for f in bad["files"].values() for n in f["reasons"].values())
    if problems > len(bad["listed"]):
        print(f"... and {problems - len(bad['listed']):,} more")
    for f in bad["files"].values():
        print(f"{f['file']}: {f['rows']:,} bad rows (" + ", ".join(f"{n:,} {r}" for r, n in f["reasons"].items())
              + ")")
    print(f"prepare: {bad['rows']:,} bad rows (data rows, header not counted); nothing written. Fix them, or "
          "prepare with --on-bad-rows drop to drop and count them")
    return 1


def main(args) -> int:
    """The ``prepare`` subcommand (flags: source, preset, config, sets, sample_users, seed, on_bad_rows, out,
    overwrite, inspect, list_presets, show_preset, quiet)."""
    if args.inspect is not None:
        print(inspect(args.inspect))
        return 0
    if args.list_presets:
        print("\n".join(preset_summaries()))
        print("\nm3bsr prepare --show-preset NAME prints one (a --config template); docs/data.md §7 describes them")
        return 0
    if args.show_preset is not None:
        print(preset_path(args.show_preset, "--show-preset").read_text(), end="")
        return 0
    if not args.source:
        raise input_error("prepare", "no SOURCE given", "Write `m3bsr prepare SOURCE --preset NAME --out DIR` "
                          "or `m3bsr prepare --inspect DIR`")
    if args.out is None:
        raise input_error("prepare", "no --out given", "Add --out DIR")
    preset = args.preset
    if preset is None and args.config is None:
        if args.source == "synthetic":
            preset = "synthetic"
        elif not args.sets:  # --set alone may describe a simple log, e.g. --set events.behavior=play
            raise input_error("prepare", "no --preset, --config or --set given",
                              "Add --preset NAME (ml100k_mm, retail_rocket, tmall, otto, synthetic), --config FILE, "
                              "or --set events.behavior=NAME for a user,item,timestamp log of one behavior")
    flags = [f"sample_users={args.sample_users}"] if args.sample_users is not None else []
    flags += [f"seed={args.seed}"] if args.seed is not None else []
    flags += [f"on_bad_rows={args.on_bad_rows}"] if args.on_bad_rows is not None else []
    cfg = load_prepare_config(preset, args.config, list(args.sets) + flags)  # the flags win over --set
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr))
    manifest = prepare(args.source, cfg, args.out, overwrite=args.overwrite, log=log)
    if manifest.get("on_bad_rows") == "report":
        return _print_report(manifest["bad_rows"])
    if manifest.get("up_to_date"):
        print(f"{args.out}: up to date")
    else:
        print(format_statistics(manifest))
    return 0
