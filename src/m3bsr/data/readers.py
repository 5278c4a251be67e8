"""Readers: an event log file → one pandas event table, in input order.

Output columns: ``user`` (str, original id), ``item`` (str), ``behavior`` (str; ``events.behavior``
on every row of a log without a behavior column), ``timestamp`` (int64), plus ``rating`` (float64)
when the log has one. Formats: CSV (plain or .gz, any
delimiter), Parquet, JSON lines of flat rows, OTTO sessions
(``{"session", "events": [{"aid", "ts", "type"}]}``) and RecBole atomic ``.inter`` files
(tab-separated, header ``name:type``). Every problem is an :class:`~m3bsr.errors.InputError`
naming the file, the row (1-based data row) or column, and the fix.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr.data.config import ColumnsConfig, EventsConfig, ItemsConfig
from m3bsr.errors import input_error

EVENT_TABLE_COLUMNS = ["user", "item", "behavior", "timestamp"]


def detect_format(path: Path) -> str:
    """Format name from the file name (``auto``)."""
    name = path.name.lower()
    for suffix in (".gz", ".gzip"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".parquet") or name.endswith(".pq"):
        return "parquet"
    if name.endswith(".jsonl") or name.endswith(".ndjson") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".inter"):
        return "recbole"
    if name.endswith(".csv") or name.endswith(".tsv") or name.endswith(".txt"):
        return "csv"
    raise input_error(str(path), "cannot tell the file format from its name",
                      "Set events.format to csv, parquet, jsonl, otto or recbole")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise input_error(str(path), "file not found", "Check SOURCE and the preset's events.path / items.path")
    if path.is_dir():
        raise input_error(str(path), "is a folder, expected a file", "Point to the event file inside it")
    if path.stat().st_size == 0:
        raise input_error(str(path), "file is empty", "Re-export the file")


def _read_csv(path: Path, delimiter: str | None) -> pd.DataFrame:
    sep = delimiter or ("\t" if path.name.lower().split(".gz")[0].endswith((".tsv", ".inter")) else ",")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[""],
                         compression="infer", engine="c")
    except pd.errors.EmptyDataError:
        raise input_error(str(path), "file is empty (no header)", "Re-export the file") from None
    except pd.errors.ParserError as e:
        raise input_error(str(path), f"malformed CSV ({str(e).strip().splitlines()[-1]})",
                          "Every row needs as many fields as the header; check events.delimiter") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise input_error(str(path), f"cannot decompress/read ({type(e).__name__}: {e})",
                          "The file is truncated or corrupt; download/export it again") from None
    except UnicodeDecodeError as e:
        raise input_error(str(path), f"not UTF-8 text at byte {e.start}", "Convert the file to UTF-8") from None
    if len(df.columns) == 1:
        header = str(df.columns[0])
        other = next((d for d in (",", ";", "\t", "|", " ") if d != sep and d in header), None)
        if other is not None:
            raise input_error(str(path), f"header {header!r} has one column with delimiter {sep!r}; "
                              f"it looks {other!r}-delimited", f"Set events.delimiter={other!r}")
    return df


def _read_jsonl(path: Path) -> pd.DataFrame:
    try:
        return pd.read_json(path, lines=True, dtype=False, compression="infer")
    except ValueError as e:
        raise input_error(str(path), f"not valid JSON lines ({e})", "Write one JSON object per line") from None
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as e:
        raise input_error(str(path), f"cannot decompress/read ({type(e).__name__})",
                          "The file is truncated or corrupt") from None


def _read_otto(path: Path) -> pd.DataFrame:
    """OTTO sessions → flat rows ``session, aid, ts, type`` (session order, then event order)."""
    sessions = _read_jsonl(path)
    for col in ("session", "events"):
        if col not in sessions.columns:
            raise input_error(str(path), f"missing key {col!r} in the OTTO rows",
                              'Each line must be {"session": ..., "events": [{"aid", "ts", "type"}]}')
    lengths = sessions["events"].map(lambda e: len(e) if isinstance(e, list) else -1).to_numpy()
    bad = np.flatnonzero(lengths < 0)
    if len(bad):
        raise input_error(f"{path} row {bad[0] + 1}", "'events' is not a list", "Fix the row")
    flat = [ev for evs in sessions["events"] for ev in evs]
    df = pd.DataFrame.from_records(flat)
    if df.empty:
        raise input_error(str(path), "no events in any session", "Check the file")
    df.insert(0, "session", np.repeat(sessions["session"].to_numpy(), lengths))
    return df


def _read_recbole(path: Path, delimiter: str | None) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header ``field:type``; the type suffix is stripped."""
    df = _read_csv(path, delimiter or "\t")
    df.columns = [str(c).split(":", 1)[0] for c in df.columns]
    return df


def read_raw(path: Path, fmt: str = "auto", delimiter: str | None = None) -> pd.DataFrame:
    """Read ``path`` into a DataFrame of its raw columns (no renaming, no validation of values)."""
    path = Path(path)
    _check_file(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "csv":
        df = _read_csv(path, delimiter)
    elif fmt == "recbole":
        df = _read_recbole(path, delimiter)
    elif fmt == "jsonl":
        df = _read_jsonl(path)
    elif fmt == "otto":
        df = _read_otto(path)
    elif fmt == "parquet":
        try:
            df = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise input_error(str(path), f"not a readable Parquet file ({type(e).__name__})",
                              "Re-export the file") from None
    else:
        raise AssertionError(fmt)
    if len(df) == 0:
        raise input_error(str(path), "no data rows (header only?)", "The file needs at least one event")
    return df


def _ids(col: pd.Series, where: str, what: str, integer: bool) -> pd.Series:
    """Original ids as strings; empty → error; with ``integer`` non-integers → error."""
    if col.dtype.kind == "f":  # e.g. JSON/Parquet floats 3.0 → "3"
        vals = col.to_numpy()
        ok = np.isfinite(vals) & (vals == np.round(vals))
        if (~ok).any():
            row = int(np.flatnonzero(~ok)[0])
            raise input_error(f"{where} row {row + 1}", f"{what} id {col.iloc[row]!r} is empty or not an integer",
                              f"Every {what} needs an id")
        col = pd.Series(vals.astype(np.int64), index=col.index)
    s = col.astype("string").str.strip()
    empty = s.isna() | (s == "")
    if empty.any():
        row = int(np.flatnonzero(empty.to_numpy())[0])
        raise input_error(f"{where} row {row + 1}", f"empty {what} id", f"Every event needs a {what} id; "
                          "drop or fix the row")
    if integer:
        bad = ~s.str.fullmatch(r"[+-]?\d+").astype(bool)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise input_error(f"{where} row {row + 1}", f"{what} id {s.iloc[row]!r} is not an integer",
                              "Fix the id, or set events.integer_ids=false")
        s = s.astype(np.int64).astype("string")  # "007" and "7" are the same integer id
    return s.astype(object)


def parse_timestamps(col: pd.Series, where: str) -> np.ndarray:
    """Integers, integral floats or ISO-8601 strings (→ Unix seconds) → int64; NaN/negative → error."""
    if col.dtype.kind in "iu":
        ts = col.to_numpy().astype(np.int64)
    else:
        num = pd.to_numeric(col, errors="coerce")
        text = col.astype("string")
        blank = text.isna() | text.str.strip().str.lower().isin(["", "nan", "na", "null", "none"])
        unparsed = num.isna() & ~blank
        if unparsed.any():
            iso = pd.to_datetime(text[unparsed], errors="coerce", utc=True, format="ISO8601")
            if iso.isna().any():
                row = int(np.flatnonzero(unparsed.to_numpy())[int(np.flatnonzero(iso.isna().to_numpy())[0])])
                raise input_error(f"{where} row {row + 1}", f"timestamp {col.iloc[row]!r} is not a number or "
                                  "an ISO-8601 date", "Fix the value")
            num = num.astype(np.float64)
            epoch = pd.Timestamp(0, tz="UTC")  # resolution-independent (pandas 3 may use us)
            num[unparsed] = ((iso - epoch) // pd.Timedelta(seconds=1)).astype(np.float64)
        vals = num.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~np.isfinite(vals)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise input_error(f"{where} row {row + 1}", f"timestamp is missing or NaN ({col.iloc[row]!r})",
                              "Every event needs a timestamp")
        ts = np.floor(vals).astype(np.int64)
    neg = ts < 0
    if neg.any():
        row = int(np.flatnonzero(neg)[0])
        raise input_error(f"{where} row {row + 1}", f"negative timestamp {ts[row]}", "Timestamps are Unix times >= 0")
    return ts


def _rating_to_behavior(rating: np.ndarray, cfg: EventsConfig, where: str) -> np.ndarray:
    """First matching ``rating_behaviors`` range → behavior name; unmatched → None (dropped later)."""
    out = np.full(len(rating), None, dtype=object)
    for r in reversed(cfg.rating_behaviors):  # earlier ranges win
        lo = -np.inf if r.min is None else r.min
        hi = np.inf if r.max is None else r.max
        out[(rating >= lo) & (rating <= hi)] = r.behavior
    return out


def to_event_table(raw: pd.DataFrame, cfg: EventsConfig, where: str) -> pd.DataFrame:
    """Map raw columns to the event table (see module docstring); checks columns and values."""
    cols: ColumnsConfig = cfg.columns
    wanted = {"user": cols.user, "item": cols.item, "timestamp": cols.timestamp}
    if cols.behavior is not None and cfg.behavior is None:
        wanted["behavior"] = cols.behavior
    if cols.rating is not None:
        wanted["rating"] = cols.rating
    found = [str(c) for c in raw.columns]
    for key, name in wanted.items():
        if name not in found:
            one = "; for a log of one behavior without this column set events.behavior=NAME" \
                if key == "behavior" else ""
            raise input_error(where, f"missing column {name!r} (the {key} column; found: {', '.join(found)})",
                              f"Set events.columns.{key}=NAME or fix the header{one}")
    extra = [c for c in found if c not in wanted.values() and c not in cfg.ignore_columns]
    if extra:
        if cfg.behavior is not None and extra[0] == ColumnsConfig.model_fields["behavior"].default:
            raise input_error(where, f"events.behavior={cfg.behavior!r} says the log has no behavior column, but it "
                              f"has one ({extra[0]!r})", "Drop events.behavior and name the behaviors in "
                              "behaviors.target/auxiliary, or list the column in events.ignore_columns")
        raise input_error(where, f"unexpected column {extra[0]!r} (expected: {', '.join(wanted.values())})",
                          f"Map it with events.columns.*, or list it in events.ignore_columns")
    out = pd.DataFrame({
        "user": _ids(raw[cols.user], where, "user", cfg.integer_ids),
        "item": _ids(raw[cols.item], where, "item", cfg.integer_ids),
    })
    out["timestamp"] = parse_timestamps(raw[cols.timestamp], where)
    if cols.rating is not None:
        rating = pd.to_numeric(raw[cols.rating], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(rating)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise input_error(f"{where} row {row + 1}", f"rating {raw[cols.rating].iloc[row]!r} is not a number",
                              "Fix the value")
        out["rating"] = rating
    if cfg.behavior is not None:  # a single-behavior log: every row is that behavior
        out["behavior"] = np.full(len(out), cfg.behavior, dtype=object)
    elif cols.behavior is not None:
        beh = raw[cols.behavior].astype("string").str.strip()
        empty = beh.isna() | (beh == "")
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise input_error(f"{where} row {row + 1}", "empty behavior", "Every event needs a behavior name")
        out["behavior"] = beh.astype(object).to_numpy()
    elif cols.rating is not None and cfg.rating_behaviors:
        out["behavior"] = _rating_to_behavior(out["rating"].to_numpy(), cfg, where)
    else:
        raise input_error(where, "no behavior column and no rating mapping",
                          "Set events.columns.behavior, events.columns.rating plus events.rating_behaviors, "
                          "or events.behavior=NAME for a log of one behavior")
    if cfg.rename:
        out["behavior"] = out["behavior"].map(lambda b: cfg.rename.get(b, b) if b is not None else None)
    return out[EVENT_TABLE_COLUMNS + (["rating"] if "rating" in out else [])].reset_index(drop=True)


def read_events(path: Path, cfg: EventsConfig) -> pd.DataFrame:
    """Read one event log file into the event table, keeping input order."""
    path = Path(path)
    return to_event_table(read_raw(path, cfg.format, cfg.delimiter), cfg, str(path))


def build_item_table(item_original: np.ndarray, cfg: ItemsConfig | None, path: Path | None, base: Path,
                     integer_ids: bool) -> pd.DataFrame:
    """items.parquet rows: dense ``item`` 1..I, ``original``, ``side_<col>`` (dense, 0 = unknown),
    ``text`` (the text columns joined by ". ") and ``image`` (absolute path, null if no file)."""
    table = pd.DataFrame({"item": np.arange(1, len(item_original) + 1, dtype=np.int32),
                          "original": np.asarray(item_original).astype(str)})
    if cfg is None or path is None:
        return table
    where = str(path)
    raw = read_raw(path, cfg.format, cfg.delimiter)
    needed = [cfg.id_column, *cfg.side, *cfg.text]
    for col in needed:
        if col not in raw.columns:
            raise input_error(where, f"missing column {col!r} (found: {', '.join(map(str, raw.columns))})",
                              "Fix items.id_column / items.side / items.text or the header")
    ids = _ids(raw[cfg.id_column], where, "item", integer_ids)
    dup = ids.duplicated()
    if dup.any():
        row = int(np.flatnonzero(dup.to_numpy())[0])
        raise input_error(f"{where} row {row + 1}", f"duplicate item id {ids.iloc[row]!r}", "One row per item")
    raw = raw.set_index(pd.Index(ids.to_numpy(), name=None)).reindex(table["original"].to_numpy())
    for col in cfg.side:
        vals = raw[col].astype("string")
        vals = vals.where(vals.str.strip() != "")
        uniq = np.sort(vals.dropna().unique().astype(str))
        table[f"side_{col}"] = (pd.Index(uniq).get_indexer(vals.fillna("\0").to_numpy()) + 1).astype(np.int32)
    if cfg.text:
        parts = raw[cfg.text].astype("string").fillna("").apply(lambda r: ". ".join(x.strip() for x in r
                                                                                  if x.strip()), axis=1)
        table["text"] = parts.to_numpy().astype(str) if len(parts) else np.array([], dtype=str)
    if cfg.image:
        paths = [base / cfg.image.format(item=o) for o in table["original"]]
        table["image"] = pd.array([str(p.resolve()) if p.is_file() else None for p in paths], dtype="string")
    return table
