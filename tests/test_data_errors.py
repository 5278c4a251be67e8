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
    msg = _expect_error(src, capsys, "behaviors.auxiliary=[]", match="events.csv row 1: unknown behavior 'view'")
    assert "behaviors.ignore" in msg
    rc, err, out = _run(src, capsys, "behaviors.auxiliary=[]", "behaviors.ignore=[view]")
    assert rc == 0, err
    manifest = yaml.safe_load((out / "manifest.json").read_text())
    assert manifest["behaviors"]["auxiliary"] == [] and manifest["statistics"]["streams"]["auxiliary"]["events"] == 0
