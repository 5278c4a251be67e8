"""Readers: an event log file → one pandas event table, in input order.

Output columns: ``user`` (str, original id), ``item`` (str), ``behavior`` (str; ``events.behavior``
on every row of a log without a behavior column), ``timestamp`` (int64), plus ``rating`` (float64)
when the log has one. Formats: CSV (plain or .gz, any
delimiter), Parquet, JSON lines of flat rows, OTTO sessions
(``{"session", "events": [{"aid", "ts", "type"}]}``) and RecBole atomic ``.inter`` files
(tab-separated, header ``name:type``). Every problem is an :class:`~m3bsr.errors.InputError`
naming the file, the row (1-based data row) or column, and the fix. Problems of single rows (a CSV
row with extra fields, an empty or bad id, timestamp, rating or behavior) are collected in a
:class:`~m3bsr.data.bad_rows.BadRows` so that every bad row of a file is reported at once; the tables
read here are indexed by their 0-based data row, so the row numbers survive dropping rows.
"""

from __future__ import annotations

import csv
import gzip
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from m3bsr.data.bad_rows import BadRows
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


def _long_rows(path: Path, sep: str) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """One pass with :mod:`csv` (only after pandas met a row with extra fields): header width, data rows,
    0-based data rows with more fields than the header [N] and their field counts [N]; None when the
    file is compressed other than by gzip (then no row can be named)."""
    name = path.name.lower()
    if name.endswith((".gz", ".gzip")):
        f = gzip.open(path, "rt", encoding="utf-8", newline="")
    elif name.endswith((".bz2", ".zip", ".xz", ".zst", ".tar")):
        return None
    else:
        f = open(path, encoding="utf-8", newline="")
    with f:
        records = (r for r in csv.reader(f, delimiter=sep) if r)  # pandas skips blank lines too
        width = len(next(records, []))
        counts = np.fromiter((len(r) for r in records), np.int64)
    long = np.flatnonzero(counts > width)
    return width, len(counts), long, counts[long]


def _read_csv_with_long_rows(path: Path, kw: dict, error: pd.errors.ParserError, bad: BadRows) -> pd.DataFrame:
    """The rows of a CSV file some of whose rows have extra fields: those go to ``bad``, the others are
    read by pandas and indexed by their data row."""
    malformed = input_error(str(path), f"malformed CSV ({str(error).strip().splitlines()[-1]})",
                            "Every row needs as many fields as the header; check events.delimiter")
    try:
        found = _long_rows(path, kw["sep"])
        df = pd.read_csv(path, on_bad_lines="skip", **kw)
    except (pd.errors.ParserError, csv.Error, UnicodeDecodeError, OSError, EOFError, zlib.error):
        raise malformed from None
    if found is None or not len(found[2]) or len(df) + len(found[2]) != found[1]:
        raise malformed from None  # pandas and csv disagree on the rows: no row number can be trusted
    width, n_rows, long, fields = found
    bad.add(long, "", "rows with extra fields", "Every row needs as many fields as the header; quote fields "
            "that contain the delimiter, or check events.delimiter",
            template=f"{{}} fields, the header has {width}", values=fields)
    df.index = np.setdiff1d(np.arange(n_rows), long)
    return df


def _read_csv(path: Path, delimiter: str | None, bad: BadRows) -> pd.DataFrame:
    sep = delimiter or ("\t" if path.name.lower().split(".gz")[0].endswith((".tsv", ".inter")) else ",")
    kw = dict(sep=sep, dtype=str, keep_default_na=False, na_values=[""], compression="infer", engine="c")
    try:
        df = pd.read_csv(path, **kw)
    except pd.errors.EmptyDataError:
        raise input_error(str(path), "file is empty (no header)", "Re-export the file") from None
    except pd.errors.ParserError as e:
        df = _read_csv_with_long_rows(path, kw, e, bad)
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


def _read_recbole(path: Path, delimiter: str | None, bad: BadRows) -> pd.DataFrame:
    """RecBole atomic file: tab-separated, header ``field:type``; the type suffix is stripped."""
    df = _read_csv(path, delimiter or "\t", bad)
    df.columns = [str(c).split(":", 1)[0] for c in df.columns]
    return df


def read_raw(path: Path, fmt: str = "auto", delimiter: str | None = None, bad: BadRows | None = None
             ) -> pd.DataFrame:
    """Read ``path`` into a DataFrame of its raw columns (no renaming, no validation of values), indexed
    by 0-based data row. CSV rows with extra fields are left out and added to ``bad`` (without ``bad``
    they are an error)."""
    path = Path(path)
    _check_file(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    own = bad is None
    bad = BadRows(str(path)) if bad is None else bad
    if fmt == "csv":
        df = _read_csv(path, delimiter, bad)
    elif fmt == "recbole":
        df = _read_recbole(path, delimiter, bad)
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
    if len(df) == 0 and not len(bad):
        raise input_error(str(path), "no data rows (header only?)", "The file needs at least one event")
    if own:
        bad.raise_if_any()
    return df


def _ids(col: pd.Series, what: str, integer: bool, bad: BadRows, column: str, fix_empty: str = "") -> pd.Series:
    """Original ids as strings (index kept); empty ids and, with ``integer``, non-integers go to ``bad``
    (their value here is a placeholder: the caller drops or rejects those rows)."""
    rows = col.index.to_numpy()
    done = np.zeros(len(col), bool)
    if col.dtype.kind == "f":  # e.g. JSON/Parquet floats 3.0 → "3"
        vals = col.to_numpy()
        done = ~(np.isfinite(vals) & (vals == np.round(vals)))
        bad.add(rows[done], column, f"empty or non-integer {what} ids", f"Every {what} needs an id",
                template=f"{what} id {{!r}} is empty or not an integer", values=vals[done])
        col = pd.Series(np.where(done, 0, vals).astype(np.int64), index=col.index)
    s = col.astype("string").str.strip()
    empty = (s.isna() | (s == "")).to_numpy() & ~done
    article = "an" if what == "item" else "a"
    bad.add(rows[empty], column, f"empty {what} ids", fix_empty or f"Every event needs {article} {what} id; drop "
            "or fix the row", template=f"empty {what} id")
    done |= empty
    if integer:
        nonint = ~s.str.fullmatch(r"[+-]?\d+").fillna(False).to_numpy(bool) & ~done
        bad.add(rows[nonint], column, f"non-integer {what} ids", "Fix the id, or set events.integer_ids=false",
                template=f"{what} id {{!r}} is not an integer", values=s[nonint].to_numpy())
        done |= nonint
        s = s.where(~done, "0").astype(np.int64).astype("string")  # "007" and "7" are the same integer id
    return s.where(~done, "").astype(object)


def parse_timestamps(col: pd.Series, where: str, bad: BadRows | None = None, column: str = "") -> np.ndarray:
    """Integers, integral floats or ISO-8601 strings (→ Unix seconds) → int64 [N]; NaN, unparseable and
    negative values go to ``bad`` (value 0 here), or are an error without ``bad``."""
    own = bad is None
    bad = BadRows(where) if bad is None else bad
    rows = col.index.to_numpy()
    if col.dtype.kind == "M":  # a DataFrame's datetimes: read as the ISO-8601 text they print as
        col = col.astype("string")
    if col.dtype.kind in "iu":
        ts = col.to_numpy().astype(np.int64)
        done = np.zeros(len(ts), bool)
    else:
        num = pd.to_numeric(col, errors="coerce")
        text = col.astype("string")
        blank = text.isna() | text.str.strip().str.lower().isin(["", "nan", "na", "null", "none"])
        unparsed = (num.isna() & ~blank).to_numpy()
        num = num.astype(np.float64)
        if unparsed.any():
            iso = pd.to_datetime(text[unparsed], errors="coerce", utc=True, format="ISO8601")
            epoch = pd.Timestamp(0, tz="UTC")  # resolution-independent (pandas 3 may use us)
            num[unparsed] = ((iso - epoch) // pd.Timedelta(seconds=1)).astype(np.float64).to_numpy()
            unreadable = np.flatnonzero(unparsed)[iso.isna().to_numpy()]
            bad.add(rows[unreadable], column, "timestamps not a number or date", "Fix the value",
                    template="timestamp {!r} is not a number or an ISO-8601 date", values=col.to_numpy()[unreadable])
        else:
            unreadable = np.zeros(0, np.int64)
        vals = num.to_numpy(dtype=np.float64, na_value=np.nan)
        done = ~np.isfinite(vals)
        missing = done.copy()
        missing[unreadable] = False
        bad.add(rows[missing], column, "missing timestamps", "Every event needs a timestamp",
                template="timestamp is missing or NaN ({!r})", values=col.to_numpy()[missing])
        ts = np.floor(np.where(done, 0, vals)).astype(np.int64)
    neg = (ts < 0) & ~done
    bad.add(rows[neg], column, "negative timestamps", "Timestamps are Unix times >= 0",
            template="negative timestamp {}", values=ts[neg])
    if own:
        bad.raise_if_any()
    return np.where(neg, 0, ts)


def _rating_to_behavior(rating: np.ndarray, cfg: EventsConfig, where: str) -> np.ndarray:
    """First matching ``rating_behaviors`` range → behavior name; unmatched → None (dropped later)."""
    out = np.full(len(rating), None, dtype=object)
    for r in reversed(cfg.rating_behaviors):  # earlier ranges win
        lo = -np.inf if r.min is None else r.min
        hi = np.inf if r.max is None else r.max
        out[(rating >= lo) & (rating <= hi)] = r.behavior
    return out


def to_event_table(raw: pd.DataFrame, cfg: EventsConfig, where: str, bad: BadRows | None = None) -> pd.DataFrame:
    """Map raw columns to the event table (see module docstring), keeping ``raw``'s index (data rows).

    Missing or unexpected columns are an error at once; bad values go to ``bad`` (their rows hold
    placeholders: drop ``bad.rows()`` before use), or without ``bad`` are an error listing them all.
    """
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
    own = bad is None
    bad = BadRows(where) if bad is None else bad
    rows = raw.index.to_numpy()
    out = pd.DataFrame({
        "user": _ids(raw[cols.user], "user", cfg.integer_ids, bad, cols.user),
        "item": _ids(raw[cols.item], "item", cfg.integer_ids, bad, cols.item),
    }, index=raw.index)
    out["timestamp"] = parse_timestamps(raw[cols.timestamp], where, bad, cols.timestamp)
    if cols.rating is not None:
        rating = pd.to_numeric(raw[cols.rating], errors="coerce").to_numpy(np.float64)
        nan = ~np.isfinite(rating)
        bad.add(rows[nan], cols.rating, "ratings not a number", "Fix the value",
                template="rating {!r} is not a number", values=raw[cols.rating].to_numpy()[nan])
        out["rating"] = np.where(nan, 0.0, rating)
    if cfg.behavior is not None:  # a single-behavior log: every row is that behavior
        out["behavior"] = np.full(len(out), cfg.behavior, dtype=object)
    elif cols.behavior is not None:
        beh = raw[cols.behavior].astype("string").str.strip()
        empty = (beh.isna() | (beh == "")).to_numpy()
        bad.add(rows[empty], cols.behavior, "empty behaviors", "Every event needs a behavior name",
                template="empty behavior")
        out["behavior"] = beh.fillna("").astype(object).to_numpy()
    elif cols.rating is not None and cfg.rating_behaviors:
        out["behavior"] = _rating_to_behavior(out["rating"].to_numpy(), cfg, where)
    else:
        raise input_error(where, "no behavior column and no rating mapping",
                          "Set events.columns.behavior, events.columns.rating plus events.rating_behaviors, "
                          "or events.behavior=NAME for a log of one behavior")
    if cfg.rename:
        out["behavior"] = out["behavior"].map(lambda b: cfg.rename.get(b, b) if b is not None else None)
    if own:
        bad.raise_if_any()
    return out[EVENT_TABLE_COLUMNS + (["rating"] if "rating" in out else [])]


def read_events(path: Path, cfg: EventsConfig, bad: BadRows | None = None) -> pd.DataFrame:
    """Read one event log file into the event table, keeping input order, indexed by 0-based data row.

    With ``bad``, bad rows are added to it (and still in the table, with placeholder values);
    without, they are an error listing them.
    """
    path = Path(path)
    own = bad is None
    bad = BadRows(str(path)) if bad is None else bad
    events = to_event_table(read_raw(path, cfg.format, cfg.delimiter, bad), cfg, str(path), bad)
    if own:
        bad.raise_if_any()
    return events


def read_items(path: Path, cfg: ItemsConfig, integer_ids: bool, bad: BadRows | None = None) -> pd.DataFrame:
    """The item table's good rows, indexed by original item id (str). Rows with an empty or bad id and
    later rows of a duplicate id go to ``bad`` (without ``bad`` they are an error)."""
    where = str(path)
    own = bad is None
    bad = BadRows(where) if bad is None else bad
    raw = read_raw(path, cfg.format, cfg.delimiter, bad)
    needed = [cfg.id_column, *cfg.side, *cfg.text, *cfg.labels]
    for col in needed:
        if col not in raw.columns:
            raise input_error(where, f"missing column {col!r} (found: {', '.join(map(str, raw.columns))})",
                              "Fix items.id_column / items.side / items.text / items.labels or the header")
    n_bad = len(bad)
    ids = _ids(raw[cfg.id_column], "item", integer_ids, bad, cfg.id_column, "Every item row needs an id")
    ok = ~raw.index.isin(bad.rows()) if len(bad) > n_bad else np.ones(len(raw), bool)
    dup = ids.duplicated().to_numpy() & ok
    bad.add(raw.index.to_numpy()[dup], cfg.id_column, "duplicate item ids", "One row per item",
            template="duplicate item id {!r}", values=ids.to_numpy()[dup])
    if own:
        bad.raise_if_any()
    keep = ok & ~dup
    return raw[keep].set_index(pd.Index(ids.to_numpy()[keep], name=None))


def build_item_table(item_original: np.ndarray, cfg: ItemsConfig | None, path: Path | None, base: Path,
                     integer_ids: bool, bad: BadRows | None = None) -> pd.DataFrame:
    """items.parquet rows: dense ``item`` 1..I, ``original``, ``side_<col>`` (dense, 0 = unknown),
    ``text`` (the text columns joined by ". "), ``image`` (absolute path, null if no file) and
    ``label_<col>`` (the column as text, null if empty; read by experiments, never by models).
    Bad rows of the item table (see :func:`read_items`) are left out when ``bad`` is given."""
    table = pd.DataFrame({"item": np.arange(1, len(item_original) + 1, dtype=np.int32),
                          "original": np.asarray(item_original).astype(str)})
    if cfg is None or path is None:
        return table
    raw = read_items(path, cfg, integer_ids, bad).reindex(table["original"].to_numpy())
    for col in cfg.side:
        vals = raw[col].astype("string")
        vals = vals.where(vals.str.strip() != "")
        uniq = np.sort(vals.dropna().unique().astype(str))
        table[f"side_{col}"] = (pd.Index(uniq).get_indexer(vals.fillna("\0").to_numpy()) + 1).astype(np.int32)
    if cfg.text:
        parts = raw[cfg.text].astype("string").fillna("").apply(lambda r: ". ".join(x.strip() for x in r
                                                                                  if x.strip()), axis=1)
        table["text"] = parts.to_numpy().astype(str) if len(parts) else np.array([], dtype=str)
    for col in cfg.labels:
        vals = raw[col].astype("string").str.strip()
        table[f"label_{col}"] = pd.array(vals.where(vals != "").to_numpy(), dtype="string")
    if cfg.image:
        paths = [base / cfg.image.format(item=o) for o in table["original"]]
        table["image"] = pd.array([str(p.resolve()) if p.is_file() else None for p in paths], dtype="string")
    return table
