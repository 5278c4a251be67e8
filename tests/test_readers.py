"""Every reader turns the same small log into the same event table (ids as strings, int64 times, input order)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest

from m3bsr.data.config import EventsConfig
from m3bsr.data.readers import read_events

LOG = pd.DataFrame({
    "user": ["7", "7", "3", "7", "3", "12"],
    "item": ["100", "5", "100", "42", "5", "5"],
    "behavior": ["click", "favor", "click", "click", "favor", "click"],
    "timestamp": [1000, 1000, 999, 1005, 1001, 3],
})


def _expected() -> pd.DataFrame:
    e = LOG.copy()
    e["timestamp"] = e["timestamp"].astype(np.int64)
    return e.astype({"user": object, "item": object, "behavior": object})


def _write_all(tmp_path):
    """The LOG in every format; returns {name: (path, EventsConfig)}."""
    out = {}
    p = tmp_path / "log.csv"
    LOG.to_csv(p, index=False)
    out["csv"] = (p, EventsConfig())
    p = tmp_path / "log.csv.gz"
    with gzip.open(p, "wt") as f:
        LOG.to_csv(f, index=False)
    out["csv.gz"] = (p, EventsConfig())
    p = tmp_path / "log.tsv"
    LOG.to_csv(p, index=False, sep="\t")
    out["tsv"] = (p, EventsConfig())
    p = tmp_path / "log.parquet"
    LOG.astype({"user": np.int64, "item": np.int64}).to_parquet(p)  # integer ids in Parquet
    out["parquet"] = (p, EventsConfig())
    p = tmp_path / "log.jsonl"
    p.write_text("".join(json.dumps({"user": int(r.user), "item": r.item, "behavior": r.behavior,
                                     "timestamp": int(r.timestamp)}) + "\n" for r in LOG.itertuples()))
    out["jsonl"] = (p, EventsConfig())
    # OTTO: consecutive rows of one user form a session
    p = tmp_path / "otto.jsonl"
    lines, prev = [], None
    for r in LOG.itertuples():
        if r.user != prev:
            lines.append({"session": int(r.user), "events": []})
            prev = r.user
        lines[-1]["events"].append({"aid": int(r.item), "ts": int(r.timestamp), "type": r.behavior})
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out["otto"] = (p, EventsConfig(format="otto", columns={"user": "session", "item": "aid",
                                                           "behavior": "type", "timestamp": "ts"}))
    p = tmp_path / "log.inter"
    rb = LOG.rename(columns={"user": "user_id:token", "item": "item_id:token", "behavior": "behavior:token",
                             "timestamp": "timestamp:float"})
    rb["timestamp:float"] = rb["timestamp:float"].astype(float)
    rb.to_csv(p, index=False, sep="\t")
    out["recbole"] = (p, EventsConfig(columns={"user": "user_id", "item": "item_id"}))
    return out


def test_every_reader_gives_the_same_table(tmp_path):
    expected = _expected()
    for name, (path, cfg) in _write_all(tmp_path).items():
        got = read_events(path, cfg)
        assert list(got.columns) == ["user", "item", "behavior", "timestamp"], name
        assert got["timestamp"].dtype == np.int64, name
        pd.testing.assert_frame_equal(got, expected, check_dtype=False, obj=name)
        assert all(isinstance(x, str) for x in got["user"]), name


def test_rating_mapping_and_rename(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("u,i,r,t\n1,10,5,100\n1,11,3,101\n2,10,4,102\n2,12,1,103\n")
    cfg = EventsConfig(columns={"user": "u", "item": "i", "behavior": None, "timestamp": "t", "rating": "r"},
                       rating_behaviors=[{"behavior": "click", "max": 3}, {"behavior": "favor", "min": 4}],
                       rename={"click": "view"})
    got = read_events(p, cfg)
    assert got["behavior"].tolist() == ["favor", "view", "favor", "view"]
    assert got["rating"].tolist() == [5.0, 3.0, 4.0, 1.0]


def test_rating_outside_every_range_is_none(tmp_path):
    p = tmp_path / "ratings.csv"
    p.write_text("user,item,rating,timestamp\n1,10,5,100\n1,11,2.5,101\n")
    cfg = EventsConfig(columns={"behavior": None, "rating": "rating"},
                       rating_behaviors=[{"behavior": "favor", "min": 4}])
    beh = read_events(p, cfg)["behavior"]
    assert beh.iloc[0] == "favor" and beh.isna().tolist() == [False, True]


def test_iso_and_float_timestamps(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item,behavior,timestamp\na,x,click,2020-01-01T00:00:10Z\na,y,click,1577836811.7\n")
    got = read_events(p, EventsConfig())
    assert got["timestamp"].tolist() == [1577836810, 1577836811]


def test_integer_ids_are_normalised(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item,behavior,timestamp\n007,01,click,1\n7,1,buy,2\n")
    got = read_events(p, EventsConfig(integer_ids=True))
    assert got["user"].tolist() == ["7", "7"] and got["item"].tolist() == ["1", "1"]
    assert read_events(p, EventsConfig())["user"].tolist() == ["007", "7"]  # text ids stay verbatim


def test_ignored_columns_are_dropped(tmp_path):
    p = tmp_path / "log.csv"
    p.write_text("user,item,behavior,timestamp,price\n1,2,click,3,9.99\n")
    assert list(read_events(p, EventsConfig(ignore_columns=["price"])).columns) == \
        ["user", "item", "behavior", "timestamp"]


@pytest.mark.parametrize("sep", [";", "\t"])
def test_custom_delimiter(tmp_path, sep):
    p = tmp_path / "log.txt"
    LOG.to_csv(p, index=False, sep=sep)
    pd.testing.assert_frame_equal(read_events(p, EventsConfig(delimiter=sep, format="csv")), _expected(),
                                  check_dtype=False)


def test_every_bad_row_is_collected_with_its_data_row(tmp_path):
    from m3bsr.data.bad_rows import BadRows
    from m3bsr.errors import InputError

    p = tmp_path / "log.csv.gz"
    with gzip.open(p, "wt") as f:  # a quoted field with a newline and a blank line: still one data row each
        f.write('user,item,behavior,timestamp\n7,100,click,1\n"7\n",5,favor,2\n\n3,5,click,3,extra\n'
                '3,,click,4\n12,5,click,-1\n12,5,click,6\n')
    bad = BadRows(str(p))
    got = read_events(p, EventsConfig(), bad)
    assert bad.rows().tolist() == [2, 3, 4]  # 0-based data rows
    assert bad.counts() == {"rows with extra fields": 1, "empty item ids": 1, "negative timestamps": 1}
    assert got.index.tolist() == [0, 1, 3, 4, 5]  # the long row is not read; the index is the data row
    assert got.loc[5, "timestamp"] == 6
    assert bad.lines(2) == [f"{p} row 3: 5 fields, the header has 4", f"{p} row 4 (column 'item'): empty item id"]
    with pytest.raises(InputError, match=r"log.csv.gz: 3 bad rows .* row 3: 5 fields, the header has 4; row 4 "
                       r"\(item\): empty item id; row 5 \(timestamp\): negative timestamp -1\. "):
        read_events(p, EventsConfig())
