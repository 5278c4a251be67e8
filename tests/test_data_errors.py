"""Bad input → one line naming file/row/column and the fix, exit code 2, no traceback, no output dir."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
import yaml

from m3bsr.cli import main as cli_main

CONFIG = {"name": "t", "events": {"path": "events.csv", "integer_ids": True},
          "behaviors": {"target": "buy", "auxiliary": ["view"]},
          "min_user_events": 2, "n_negatives": 3}


def _good_rows():
    rows = []
    for u in range(1, 7):
        for k in range(8):
            rows.append((u, (u * 7 + k * 3) % 30 + 1, "buy" if k % 3 == 2 else "view", 100 * u + k))
    return rows


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    pd.DataFrame(_good_rows(), columns=["user", "item", "behavior", "timestamp"]).to_csv(d / "events.csv",
                                                                                          index=False)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(CONFIG))
    return d


def _run(src, capsys, *sets: str, out_name="out"):
    out = src.parent / out_name
    argv = ["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    rc = cli_main(argv)
    err = capsys.readouterr().err
    return rc, err, out


def _expect_error(src, capsys, *sets, match: str):
    rc, err, out = _run(src, capsys, *sets)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("m3bsr: error: "), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in src.parent.iterdir() if p.name.startswith(".out")]  # no temp dir left
    return lines[0]


def _edit(src, text: str, name="events.csv"):
    (src / name).write_text(text)


def test_good_input_works(src, capsys):
    rc, err, out = _run(src, capsys)
    assert rc == 0, err
    assert (out / "manifest.json").is_file()


def test_missing_column(src, capsys):
    _edit(src, "user,item,behavior\n1,2,buy\n")
    _expect_error(src, capsys, match="events.csv: missing column 'timestamp'")


def test_extra_column(src, capsys):
    _edit(src, "user,item,behavior,timestamp,price\n1,2,buy,5,1.0\n")
    msg = _expect_error(src, capsys, match="unexpected column 'price'")
    assert "events.ignore_columns" in msg


def test_row_with_extra_field(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n1,2,buy,5\n1,3,buy,6,7\n")
    _expect_error(src, capsys, match="events.csv row 2: 5 fields, the header has 4")


def test_empty_id(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n1,2,buy,5\n1,,buy,6\n")
    _expect_error(src, capsys, match="events.csv row 2: empty item id")


def test_non_integer_id(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n1,2,buy,5\nx7,3,buy,6\n")
    msg = _expect_error(src, capsys, match="events.csv row 2: user id 'x7' is not an integer")
    assert "integer_ids=false" in msg


def test_unknown_behavior(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n1,2,buy,5\n1,3,purchase,6\n")
    msg = _expect_error(src, capsys, match="events.csv row 2: unknown behavior 'purchase'")
    assert "behaviors.ignore" in msg


def test_target_behavior_absent(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n1,2,view,5\n1,3,view,6\n")
    _expect_error(src, capsys, match="target behavior 'buy' does not occur (present: view)")


@pytest.mark.parametrize("value,text", [("", "timestamp is missing or NaN"), ("nan", "timestamp is missing or NaN"),
                                        ("-5", "negative timestamp -5"), ("soon", "timestamp 'soon' is not a number or an ISO")])
def test_bad_timestamp(src, capsys, value, text):
    _edit(src, f"user,item,behavior,timestamp\n1,2,buy,5\n1,3,buy,{value}\n")
    _expect_error(src, capsys, match=f"events.csv row 2: {text}")


def test_empty_result_after_filtering(src, capsys):
    msg = _expect_error(src, capsys, "min_user_events=100", match="no user left after filtering")
    assert "Lower the thresholds" in msg


def test_too_few_unseen_items(src, capsys):
    _expect_error(src, capsys, "n_negatives=40", match="catalogue items are unseen; n_negatives=40")


def test_missing_file(src, capsys):
    (src / "events.csv").unlink()
    _expect_error(src, capsys, match="events.csv: events file not found")


def test_truncated_gzip(src, capsys):
    data = gzip.compress((src / "events.csv").read_bytes() * 50)
    (src / "events.csv.gz").write_bytes(data[: len(data) // 2])
    _expect_error(src, capsys, "events.path=events.csv.gz", match="events.csv.gz: cannot decompress/read")


def test_empty_file(src, capsys):
    _edit(src, "")
    _expect_error(src, capsys, match="events.csv: file is empty")


def test_header_only(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n")
    _expect_error(src, capsys, match="no data rows (header only?)")


def test_wrong_delimiter(src, capsys):
    _edit(src, "user;item;behavior;timestamp\n1;2;buy;5\n")
    msg = _expect_error(src, capsys, match="it looks ';'-delimited")
    assert "events.delimiter=';'" in msg


def _features(src, name, ids, x):
    np.save(src / name, np.asarray(x, np.float32))
    (src / f"{name}.ids").write_text("".join(f"{i}\n" for i in ids))


def test_nan_features(src, capsys):
    _features(src, "text.npy", [1, 2, 3], [[0, 1], [np.nan, 1], [1, 1]])
    _expect_error(src, capsys, "features.text=text.npy", match="text.npy row 2: NaN/inf in the features of item '2'")


def test_inf_features_parquet(src, capsys):
    pd.DataFrame({"item": [5, 6], "embedding": [[1.0, np.inf], [0.0, 0.0]]}).to_parquet(src / "img.parquet")
    _expect_error(src, capsys, "features.image=img.parquet", match="img.parquet row 1: NaN/inf")


def test_feature_width_mismatch(src, capsys):
    _features(src, "text.npy", [1, 2], [[0, 1], [1, 1], [2, 2]])
    _expect_error(src, capsys, "features.text=text.npy", match="text.npy.ids: 2 ids but 3 rows in text.npy")


def test_ragged_feature_rows(src, capsys):
    pd.DataFrame({"item": [5, 6], "embedding": [[1.0, 2.0], [0.0]]}).to_parquet(src / "img.parquet")
    _expect_error(src, capsys, "features.image=img.parquet", match="img.parquet row 2: embedding width 1, row 1 has 2")


def test_duplicate_feature_rows(src, capsys):
    from safetensors.numpy import save_file

    save_file({"ids": np.array([4, 9, 4], np.int64), "features": np.ones((3, 2), np.float32)},
              str(src / "f.safetensors"))
    _expect_error(src, capsys, "features.image=f.safetensors",
                  match="f.safetensors row 3: duplicate item id '4' (also row 1)")


def test_unknown_config_key(src, capsys):
    _expect_error(src, capsys, "min_user_event=3", match="unknown prepare key 'min_user_event'")


def test_misspelt_section_is_reported_as_unknown_not_missing(src, capsys):
    cfg = dict(CONFIG)
    cfg["behaviours"] = cfg.pop("behaviors")  # British spelling: `behaviors` is now also missing
    (src.parent / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    line = _expect_error(src, capsys, match="unknown prepare key 'behaviours'")
    assert "Did you mean behaviors?" in line and "required" not in line


def test_existing_different_output(src, capsys):
    rc, _, out = _run(src, capsys)
    assert rc == 0
    before = (out / "manifest.json").read_bytes()
    rc, err, _ = _run(src, capsys, "n_negatives=2")
    assert rc == 2 and "exists and was prepared from other sources or another config" in err
    assert "--overwrite" in err and (out / "manifest.json").read_bytes() == before  # untouched
    argv = ["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(out), "--quiet",
            "--set", "n_negatives=2", "--overwrite"]
    assert cli_main(argv) == 0
    assert (out / "manifest.json").read_bytes() != before


def test_up_to_date_message(src, capsys):
    argv = ["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(src.parent / "o")]
    assert cli_main(argv) == 0
    capsys.readouterr()
    assert cli_main(argv) == 0
    assert "up to date" in capsys.readouterr().out


# --------------------------------------------------------------------------- single-behavior logs


def _plays(src, header="user,item,timestamp", rows=None) -> str:
    rows = rows or [f"{u},{(u * 5 + k) % 30 + 1},{100 * u + k}" for u in range(1, 7) for k in range(6)]
    path = src / "plays.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return str(path)


def _prepare_plays(src, capsys, *sets):
    out = src.parent / "plays_out"
    argv = ["prepare", _plays(src), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    rc = cli_main(argv)
    return rc, capsys.readouterr(), out


def test_single_behavior_log_needs_only_set(src, capsys):
    rc, cap, out = _prepare_plays(src, capsys, "events.behavior=play", "n_negatives=3")
    assert rc == 0, cap.err
    assert "auxiliary=none (single-behavior dataset)" in cap.out
    rc, cap, _ = _prepare_plays(src, capsys)
    assert rc == 2 and "no --preset, --config or --set given" in cap.err and "events.behavior=NAME" in cap.err


def test_single_behavior_log_without_the_key(src, capsys):
    rc, cap, out = _prepare_plays(src, capsys, "behaviors.target=play", "n_negatives=3")
    lines = cap.err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and not out.exists()
    assert "plays.csv: missing column 'behavior'" in lines[0] and "set events.behavior=NAME" in lines[0]


def test_single_behavior_key_with_a_behavior_column(src, capsys):
    msg = _expect_error(src, capsys, "events.behavior=buy", match="events.behavior='buy' says the log has no "
                        "behavior column, but it has one ('behavior')")
    assert "Drop events.behavior" in msg


def test_single_behavior_key_conflicts_with_a_column_mapping(src, capsys):
    _expect_error(src, capsys, "events.behavior=buy", "events.columns.behavior=kind",
                  match="events.columns.behavior='kind' names one; set only one of them")


def test_empty_auxiliary_list_keeps_the_target_only(src, capsys):
    msg = _expect_error(src, capsys, "behaviors.auxiliary=[]", match="events.csv: 36 bad rows (36 unknown behaviors")
    assert "row 1 (behavior): unknown behavior 'view'; row 2 (behavior)" in msg and "and 16 more" in msg
    assert "behaviors.ignore" in msg
    rc, err, out = _run(src, capsys, "behaviors.auxiliary=[]", "behaviors.ignore=[view]")
    assert rc == 0, err
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["behaviors"]["auxiliary"] == [] and manifest["statistics"]["streams"]["auxiliary"]["events"] == 0


# --------------------------------------------------------------------------- bad rows: error | report | drop

# data row (1-based, header not counted) → (the CSV line, the problem prepare names)
BAD_ROWS = {
    3: ("1,2,buy,5,9", "row 3: 5 fields, the header has 4"),
    5: ("1,,buy,6", "row 5 (item): empty item id"),
    8: ("2,3,view,-5", "row 8 (timestamp): negative timestamp -5"),
    10: ("3,4,purchase,7", "row 10 (behavior): unknown behavior 'purchase'"),
    12: ("x7,3,buy,6", "row 12 (user): user id 'x7' is not an integer"),
    13: ("4,5,buy,soon", "row 13 (timestamp): timestamp 'soon' is not a number or an ISO-8601 date"),
}


def _dirty(src) -> None:
    """The good log with BAD_ROWS at their data rows, and a blank line (not a data row) before row 5."""
    good = iter(f"{u},{i},{b},{t}" for u, i, b, t in _good_rows())
    lines = ["user,item,behavior,timestamp"]
    for row in range(1, len(_good_rows()) + len(BAD_ROWS) + 1):
        if row == 5:
            lines.append("")
        lines.append(BAD_ROWS[row][0] if row in BAD_ROWS else next(good))
    _edit(src, "\n".join(lines) + "\n")


def test_error_lists_every_bad_row_with_its_data_row(src, capsys):
    _dirty(src)
    msg = _expect_error(src, capsys, match="events.csv: 6 bad rows (1 rows with extra fields, 1 non-integer user "
                        "ids, 1 empty item ids, 1 timestamps not a number or date, 1 negative timestamps, "
                        "1 unknown behaviors; data rows, header not counted): row 3: 5 fields")
    listed = [problem for _, problem in BAD_ROWS.values()]
    assert all(p in msg for p in listed), msg
    assert [msg.index(p) for p in listed] == sorted(msg.index(p) for p in listed)  # by row
    assert "behaviors.ignore" in msg and "integer_ids=false" in msg and "--on-bad-rows drop" in msg


def test_error_lists_at_most_20_and_counts_the_rest(src, capsys):
    _edit(src, "user,item,behavior,timestamp\n" + "".join(f"{u},{i},{b},{t}\n" for u, i, b, t in _good_rows())
          + "".join(f"1,,buy,{k}\n" for k in range(30)))
    msg = _expect_error(src, capsys, match="events.csv: 30 bad rows (30 empty item ids")
    assert "row 49 (item): empty item id; " in msg and "row 68 (item)" in msg and "row 69 (item)" not in msg
    assert "and 10 more" in msg


def test_report_lists_every_bad_row_and_writes_nothing(src, capsys):
    _dirty(src)
    out = src.parent / "out"
    argv = ["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(out), "--quiet",
            "--on-bad-rows", "report"]
    rc = cli_main(argv)
    cap = capsys.readouterr()
    assert rc == 1 and not out.exists(), cap
    events = str(src / "events.csv")
    assert cap.out.splitlines()[:6] == [
        f"{events} row 3: 5 fields, the header has 4", f"{events} row 5 (column 'item'): empty item id",
        f"{events} row 8 (column 'timestamp'): negative timestamp -5",
        f"{events} row 10 (column 'behavior'): unknown behavior 'purchase'",
        f"{events} row 12 (column 'user'): user id 'x7' is not an integer",
        f"{events} row 13 (column 'timestamp'): timestamp 'soon' is not a number or an ISO-8601 date"]
    assert f"{events}: 6 bad rows (1 rows with extra fields" in cap.out and "nothing written" in cap.out
    _edit(src, "user,item,behavior,timestamp\n" + "".join(f"{u},{i},{b},{t}\n" for u, i, b, t in _good_rows()))
    assert cli_main(argv) == 0 and not out.exists()
    assert "no bad rows" in capsys.readouterr().out


def test_report_counts_beyond_what_it_lists(src, capsys, monkeypatch):
    import m3bsr.data.prepare as prep

    monkeypatch.setattr(prep, "BAD_ROWS_REPORTED", 25)
    _edit(src, "user,item,behavior,timestamp\n" + "".join(f"{u},{i},{b},{t}\n" for u, i, b, t in _good_rows())
          + "".join(f"1,,buy,{k}\n" for k in range(30)))
    out = src.parent / "out"
    rc = cli_main(["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(out),
                   "--set", "on_bad_rows=report"])
    lines = capsys.readouterr().out.splitlines()
    assert rc == 1 and not out.exists()
    assert lines[24].endswith("row 73 (column 'item'): empty item id") and lines[25] == "... and 5 more"


def test_drop_counts_in_the_manifest_and_equals_the_clean_log(src, capsys):
    import json

    _dirty(src)
    argv = ["prepare", str(src), "--config", str(src.parent / "cfg.yaml"), "--out", str(src.parent / "dirty"),
            "--on-bad-rows", "drop"]
    assert cli_main(argv) == 0
    cap = capsys.readouterr()
    assert "prepare: dropped 6 bad rows of" in cap.err and "1 unknown behaviors" in cap.err
    assert "filter: bad_rows_dropped" in cap.out
    manifest = json.loads((src.parent / "dirty" / "manifest.json").read_text())
    assert manifest["statistics"]["filtering"]["bad_rows_dropped"] == 6
    dropped = manifest["bad_rows_dropped"]
    assert dropped["rows"] == 6 and dropped["files"]["events"]["reasons"] == {
        "rows with extra fields": 1, "empty item ids": 1, "negative timestamps": 1,
        "timestamps not a number or date": 1, "non-integer user ids": 1, "unknown behaviors": 1}
    assert manifest["config"]["on_bad_rows"] == "drop"
    _edit(src, "user,item,behavior,timestamp\n" + "".join(f"{u},{i},{b},{t}\n" for u, i, b, t in _good_rows()))
    rc, err, clean = _run(src, capsys)
    assert rc == 0, err
    for name in ("events.parquet", "users.parquet", "items.parquet", "valid.parquet", "test.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(src.parent / "dirty" / name), pd.read_parquet(clean / name))


def test_drop_bad_feature_and_item_rows(src, capsys):
    import json

    _features(src, "text.npy", [1, 2, 3, 3], [[0, 1], [np.nan, 1], [1, 1], [2, 2]])
    (src / "items.csv").write_text("item,title\n1,a\n,b\n2,c\n1,d\n")
    sets = ["features.text=text.npy", "items.path=items.csv", "items.text=[title]"]
    msg = _expect_error(src, capsys, *sets, match="items.csv: 2 bad rows (1 empty item ids, 1 duplicate item ids")
    assert "row 2 (item): empty item id; row 4 (item): duplicate item id '1'" in msg
    rc, err, out = _run(src, capsys, *sets, "on_bad_rows=drop")
    assert rc == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    files = manifest["bad_rows_dropped"]["files"]
    assert files["items"]["reasons"] == {"empty item ids": 1, "duplicate item ids": 1}
    assert files["features.text"]["reasons"] == {"non-finite features": 1, "duplicate item ids": 1}
    mask = np.load(out / "features" / "text_mask.npy")
    x = np.load(out / "features" / "text.npy")
    assert mask[1:4].tolist() == [True, False, True] and x[3].tolist() == [1, 1]  # item 2 masked, first 3 kept
    items = pd.read_parquet(out / "items.parquet")
    assert items["text"].tolist()[:2] == ["a", "c"]  # item 1 keeps its first row
