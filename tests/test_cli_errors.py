"""The bad-input matrix, through the real CLI: every case exits 2 with ONE line naming the file and the
row/column/key plus a fix, shows no traceback (``--debug`` does), and leaves no partial output.

Most cases run in-process through :func:`m3bsr.cli.main` (a subprocess costs ~3 s of torch import);
:func:`test_matrix_subprocess` runs a handful as ``python -m m3bsr`` to prove the real entry point.
docs/reliability.md lists each case with its message.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import yaml
from factories import make_tiny_prepared

from m3bsr.cli import main as cli_main
from m3bsr.config import build_config
from m3bsr.errors import InputError

PREPARE_CFG = {"name": "t", "events": {"path": "events.csv", "integer_ids": True},
               "behaviors": {"target": "buy", "auxiliary": ["view"]}, "min_user_events": 2, "n_negatives": 3}
HEADER = "user,item,behavior,timestamp\n"


def _good_csv() -> str:
    rows = [f"{u},{(u * 7 + k * 3) % 30 + 1},{'buy' if k % 3 == 2 else 'view'},{100 * u + k}"
            for u in range(1, 7) for k in range(8)]
    return HEADER + "\n".join(rows) + "\n"


@dataclass
class Ctx:
    """What a case may use: a scratch folder and the module's trained runs (``pop``, ``sasrec``)."""

    tmp: Path
    runs: dict[str, Path]


@dataclass
class Setup:
    argv: list[str]
    absent: list[Path]  # outputs that must not exist afterwards (nor any ``.<name>.*.tmp`` sibling)
    unchanged: list[Path]  # folders whose files must be byte-identical afterwards


# --------------------------------------------------------------------------- case builders


def _prepare(ctx: Ctx, csv: str | None = None, *sets: str, name: str = "events.csv") -> Setup:
    src = ctx.tmp / "src"
    src.mkdir(exist_ok=True)
    if csv is not None:
        (src / name).write_text(csv)
    elif not (src / name).exists():
        (src / name).write_text(_good_csv())
    cfg = ctx.tmp / "prep.yaml"
    cfg.write_text(yaml.safe_dump(PREPARE_CFG))
    out = ctx.tmp / "prepared"
    argv = ["prepare", str(src), "--config", str(cfg), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    return Setup(argv, [out], [src])


def _features(ctx: Ctx, name: str, ids: list[int], x, modality: str = "text") -> Setup:
    src = ctx.tmp / "src"
    src.mkdir(exist_ok=True)
    np.save(src / name, np.asarray(x, np.float32))
    (src / f"{name}.ids").write_text("".join(f"{i}\n" for i in ids))
    return _prepare(ctx, None, f"features.{modality}={name}")


def _parquet_features(ctx: Ctx, ids: list[int], rows: list[list[float]]) -> Setup:
    src = ctx.tmp / "src"
    src.mkdir(exist_ok=True)
    pd.DataFrame({"item": ids, "embedding": rows}).to_parquet(src / "img.parquet")
    return _prepare(ctx, None, "features.image=img.parquet")


def _truncated_gzip(ctx: Ctx) -> Setup:
    src = ctx.tmp / "src"
    src.mkdir()
    data = gzip.compress(_good_csv().encode() * 50)
    (src / "events.csv.gz").write_bytes(data[: len(data) // 2])
    return _prepare(ctx, None, "events.path=events.csv.gz")


def _train(ctx: Ctx, *extra: str, config: dict | None = None, out_name: str = "run") -> Setup:
    ds = ctx.runs["dataset"]
    out = ctx.tmp / out_name
    argv = ["train", "--dataset", str(ds), "--model", "pop", "--out", str(out), "--quiet", "--device", "cpu",
            "--set", "train.max_epochs=1"]
    if config is not None:
        (ctx.tmp / "run.yaml").write_text(yaml.safe_dump(config))
        argv += ["--config", str(ctx.tmp / "run.yaml")]
    return Setup(argv + list(extra), [out], [ds])


def _run_exists(ctx: Ctx) -> Setup:
    s = _train(ctx)
    run = s.absent.pop()
    run.mkdir()
    (run / "notes.txt").write_text("my results\n")
    s.unchanged.append(run)
    return s


def _out_under_file(ctx: Ctx, command: str) -> Setup:
    # Root ignores chmod, so "not writable" is made honest another way: the output's parent is a
    # regular file, which no user can create a folder inside.
    blocker = ctx.tmp / "a_file"
    blocker.write_text("not a folder\n")
    s = _train(ctx) if command == "train" else _prepare(ctx)
    out = blocker / "x"
    s.argv[s.argv.index("--out") + 1] = str(out)
    s.absent = [out]
    s.unchanged.append(ctx.tmp)  # nothing new next to a_file either
    return s


def _edited_run(ctx: Ctx, which: str, edit: Callable[[dict], None], command: str = "evaluate") -> Setup:
    run = ctx.tmp / f"{which}-edited"
    shutil.copytree(ctx.runs[which], run)
    raw = yaml.safe_load((run / "config.yaml").read_text())
    edit(raw)
    (run / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    argv = ["evaluate", str(run), "--quiet"] if command == "evaluate" else ["train", "--resume", str(run), "--quiet"]
    return Setup(argv, [], [run])


def _reprepared(ctx: Ctx) -> Setup:
    """A pop run on a prepared dataset that was then re-prepared (--overwrite) with another setting."""
    s = _prepare(ctx)
    assert cli_main(s.argv) == 0
    ds, run = ctx.tmp / "prepared", ctx.tmp / "run"
    assert cli_main(["train", "--dataset", str(ds), "--model", "pop", "--out", str(run), "--quiet",
                     "--device", "cpu"]) == 0
    assert cli_main(s.argv + ["--set", "n_negatives=2", "--overwrite"]) == 0
    return Setup(["evaluate", str(run), "--quiet"], [], [run, ds])


def _not_an_image(ctx: Ctx) -> Setup:
    folder = ctx.tmp / "images"
    folder.mkdir()
    (folder / "7.jpg").write_text("this is text, not a JPEG\n")
    (folder / "8.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature and nothing else
    out = ctx.tmp / "image.npy"
    return Setup(["features", "image", str(folder), "--out", str(out), "--quiet"], [out], [folder])


def _paper_on_single_behavior(ctx: Ctx) -> Setup:
    """m3bsr's paper preset on a dataset prepared from a user,item,timestamp log (no auxiliary stream)."""
    src = ctx.tmp / "plays.csv"
    src.write_text("user,item,timestamp\n" + "".join(f"{u},{(u * 7 + k * 3) % 30 + 1},{100 * u + k}\n"
                                                     for u in range(1, 7) for k in range(8)))
    ds = ctx.tmp / "plays"
    assert cli_main(["prepare", str(src), "--set", "events.behavior=play", "--set", "n_negatives=3",
                     "--out", str(ds), "--quiet"]) == 0
    out = ctx.tmp / "run"
    return Setup(["train", "--dataset", str(ds), "--model", "m3bsr", "--set", "model.preset=paper", "--out", str(out),
                  "--quiet", "--device", "cpu"], [out], [ds])


def _set_model(name: str, **extra) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        raw["model"] = {"name": name, **{k: v for k, v in raw["model"].items() if k != "name"}, **extra}
    return edit


# case id → (builder, fragments the one-line message must contain: where ... problem ... fix)
CASES: dict[str, tuple[Callable[[Ctx], Setup], list[str]]] = {
    "empty_file": (lambda c: _prepare(c, ""), ["events.csv: file is empty", "."]),
    "header_only": (lambda c: _prepare(c, HEADER), ["events.csv", "no data rows (header only?)"]),
    "wrong_delimiter": (lambda c: _prepare(c, HEADER.replace(",", ";") + "1;2;buy;5\n"),
                        ["events.csv", "';'-delimited", "events.delimiter=';'"]),
    "missing_column": (lambda c: _prepare(c, "user,item,behavior\n1,2,buy\n"),
                       ["events.csv: missing column 'timestamp'"]),
    "string_in_int_id": (lambda c: _prepare(c, HEADER + "1,2,buy,5\nx7,3,buy,6\n"),
                         ["events.csv row 2: user id 'x7' is not an integer", "integer_ids=false"]),
    "nan_timestamp": (lambda c: _prepare(c, HEADER + "1,2,buy,5\n1,3,buy,nan\n"),
                      ["events.csv row 2: timestamp is missing or NaN"]),
    "negative_timestamp": (lambda c: _prepare(c, HEADER + "1,2,buy,5\n1,3,buy,-5\n"),
                           ["events.csv row 2: negative timestamp -5"]),
    "unknown_behavior": (lambda c: _prepare(c, HEADER + "1,2,buy,5\n1,3,purchase,6\n"),
                         ["events.csv row 2: unknown behavior 'purchase'", "behaviors.ignore"]),
    "target_absent": (lambda c: _prepare(c, HEADER + "1,2,view,5\n1,3,view,6\n"),
                      ["target behavior 'buy' does not occur (present: view)"]),
    "no_behavior_column": (lambda c: _prepare(c, "user,item,timestamp\n1,2,5\n"),
                           ["events.csv: missing column 'behavior'", "set events.behavior=NAME"]),
    "behavior_key_and_column": (lambda c: _prepare(c, None, "events.behavior=buy"),
                                ["events.csv: events.behavior='buy' says the log has no behavior column, but it "
                                 "has one ('behavior')", "Drop events.behavior"]),
    "paper_preset_single_behavior": (_paper_on_single_behavior,
                                     ["model.preset=paper: the common expert attends from auxiliary to target "
                                      "events", "plays has no auxiliary behavior", "Use the default preset"]),
    "all_users_filtered": (lambda c: _prepare(c, None, "min_user_events=1000"),
                           ["no user left after filtering", "min_user_events=1000", "Lower the thresholds"]),
    "features_nan": (lambda c: _features(c, "text.npy", [1, 2, 3], [[0, 1], [np.nan, 1], [1, 1]]),
                     ["text.npy row 2: NaN/inf in the features of item '2'"]),
    "features_inf": (lambda c: _parquet_features(c, [5, 6], [[1.0, np.inf], [0.0, 0.0]]),
                     ["img.parquet row 1: NaN/inf"]),
    "features_width_mismatch": (lambda c: _parquet_features(c, [5, 6], [[1.0, 2.0], [0.0]]),
                                ["img.parquet row 2: embedding width 1, row 1 has 2"]),
    "features_ids_rows_mismatch": (lambda c: _features(c, "text.npy", [1, 2], [[0, 1], [1, 1], [2, 2]]),
                                   ["text.npy.ids: 2 ids but 3 rows in text.npy"]),
    "features_duplicate_ids": (lambda c: _parquet_features(c, [4, 9, 4], [[1.0, 0.0]] * 3),
                               ["img.parquet row 3: duplicate item id '4' (also row 1)"]),
    "truncated_gzip": (_truncated_gzip, ["events.csv.gz: cannot decompress/read"]),
    "prepare_unknown_key": (lambda c: _prepare(c, None, "min_user_event=3"),
                            ["unknown prepare key 'min_user_event'", "Did you mean min_user_events"]),
    "not_an_image": (_not_an_image, ["images", "none of the 2 image files could be decoded"]),
    "config_unknown_key": (lambda c: _train(c, config={"train": {"lrr": 0.1}}),
                           ["run.yaml", "unknown config key 'train.lrr'", "Did you mean train.lr"]),
    "config_wrong_type": (lambda c: _train(c, config={"train": {"lr": "fast"}}),
                          ["run.yaml", "config key 'train.lr'", "'fast'", "Fix the value"]),
    "set_unknown_key": (lambda c: _train(c, "--set", "train.epochs=3"),
                        ["--set", "unknown config key 'train.epochs'", "Did you mean train.max_epochs?"]),
    "set_key_of_other_model": (lambda c: _train(c, "--set", "model.no_meie=true"),
                               ["--set", "config key 'model.no_meie' does not apply to model 'pop'",
                                "Only model m3bsr has it", "--model m3bsr"]),
    "heads_not_divisor": (lambda c: _train(c, "--model", "sasrec", "--set", "model.n_heads=3"),
                          ["config key model.n_heads: hidden size 64 is not divisible by n_heads 3",
                           "Set --set model.n_heads to a divisor of model.hidden_size"]),
    "run_dir_exists": (_run_exists, ["run: run directory already exists", "--overwrite", "--resume"]),
    "train_out_under_file": (lambda c: _out_under_file(c, "train"),
                             ["a_file/x: cannot write here ('", "a_file' is a file, not a folder",
                              "Choose a writable output path"]),
    "prepare_out_under_file": (lambda c: _out_under_file(c, "prepare"),
                               ["a_file/x: cannot write here", "is a file, not a folder"]),
    "evaluate_other_model": (lambda c: _edited_run(c, "pop", _set_model("sasrec")),
                             ["pop-edited/best.pt: the checkpoint is of model 'pop' but the run's config.yaml "
                              "says 'sasrec'",
                              "Restore"]),
    "evaluate_other_hidden_size": (lambda c: _edited_run(c, "sasrec", _set_model("sasrec", hidden_size=16)),
                                   ["sasrec-edited/best.pt: the weights do not fit model 'sasrec'",
                                    "model.hidden_size=8 (config.yaml: 16)", "re-train"]),
    "evaluate_reprepared_dataset": (_reprepared,
                                    ["run/config.yaml: the run was trained on prepared data with fingerprint ",
                                     "prepared/manifest.json now has fingerprint ", "(re-prepared since?)",
                                     "Re-train on the current data (m3bsr train --config "]),
    "resume_other_hidden_size": (lambda c: _edited_run(c, "sasrec", _set_model("sasrec", hidden_size=16), "train"),
                                 ["sasrec-edited/last.pt: the weights do not fit",
                                  "model.hidden_size=8 (config.yaml: 16)"]),
}

SUBPROCESS_CASES = ["empty_file", "config_unknown_key", "run_dir_exists",
                    "train_out_under_file", "evaluate_other_hidden_size"]


# --------------------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """A tiny prepared dataset and two finished one-epoch runs on it (pop; sasrec with hidden size 8)."""
    root = tmp_path_factory.mktemp("trained")
    ds = make_tiny_prepared(root / "ds", n_users=20, n_items=30)
    runs = {"dataset": ds}
    for model, sets in (("pop", []), ("sasrec", ["model.hidden_size=8", "model.n_layers=1"])):
        argv = ["train", "--dataset", str(ds), "--model", model, "--out", str(root / model), "--quiet",
                "--device", "cpu", "--set", "train.max_epochs=1"]
        for s in sets:
            argv += ["--set", s]
        assert cli_main(argv) == 0
        runs[model] = root / model
    return runs


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _check(setup: Setup, before: dict[Path, dict], rc: int, err: str, fragments: list[str]) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("m3bsr: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert ". " in line.removeprefix("m3bsr: error: "), f"no fix sentence: {line!r}"
    _check_no_output(setup, before)
    return line


def _check_no_output(setup: Setup, before: dict[Path, dict]) -> None:
    """No output, no ``.<name>.*.tmp`` sibling, inputs (and run dirs) byte-identical."""
    for out in setup.absent:
        assert not out.exists(), out
        if out.parent.is_dir():
            leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
            assert not leftovers, leftovers
    for folder, snap in before.items():
        assert _snapshot(folder) == snap, f"{folder} was modified"


def _setup(case: str, tmp_path: Path, trained) -> tuple[Setup, list[str], dict[Path, dict]]:
    build, fragments = CASES[case]
    setup = build(Ctx(tmp_path, trained))
    return setup, fragments, {folder: _snapshot(folder) for folder in setup.unchanged}


@pytest.mark.parametrize("key, message", [
    ("train.max_epoch", "unknown config key 'train.max_epoch'. Did you mean train.max_epochs?"),
    ("model.n_layer", "unknown config key 'model.n_layer'. Did you mean model.n_layers?"),
    ("model.input", "config key 'model.input' does not apply to model 'm3bsr'. Only models gru4rec, sasrec, "
                    "bert4rec, mmsasrec have it"),
])
def test_unknown_config_key_one_suggestion_or_owner(key, message):
    """One best suggestion for a typo (not three); a key of other models names those models."""
    with pytest.raises(InputError) as e:
        build_config({}, model="m3bsr", overrides=[f"{key}=1"])
    assert message in str(e.value), str(e.value)
    assert str(e.value).count("Did you mean") <= 1 and ", train." not in str(e.value)


def test_help_describes_every_command_and_option():
    """Every subcommand has a description or help line; every option and argument has help; `train` shows
    its default model; the model list in the help is the registry's."""
    import argparse

    from m3bsr.cli import MODELS, build_parser
    from m3bsr.models.registry import model_names

    assert MODELS.split(", ") == [m for m in model_names() if m != "tiny"]
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    todo = list(commands.choices.items())
    while todo:
        name, sub = todo.pop()
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        todo += [(f"{name} {n}", p) for a in nested for n, p in a.choices.items()]
        for action in sub._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"
                if action.default not in (None, False, [], argparse.SUPPRESS) and action.dest != "help":
                    assert "default" in action.help, f"{name} {action.option_strings}: default not shown"
    for name in ("train", "evaluate"):
        assert commands.choices[name].description, name
    assert "else m3bsr" in commands.choices["train"].format_help()


def test_matrix_size():
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", list(CASES))
def test_matrix_in_process(case, tmp_path, trained, capsys):
    setup, fragments, before = _setup(case, tmp_path, trained)
    rc = cli_main(setup.argv)
    _check(setup, before, rc, capsys.readouterr().err, fragments)
    # --debug: the same error escapes with its traceback (cli.main re-raises), still no partial output
    with pytest.raises(InputError):
        cli_main(setup.argv + ["--debug"])
    _check_no_output(setup, before)


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_matrix_subprocess(case, tmp_path, trained):
    setup, fragments, before = _setup(case, tmp_path, trained)
    proc = subprocess.run([sys.executable, "-m", "m3bsr", *setup.argv], capture_output=True, text=True,
                          timeout=120)
    _check(setup, before, proc.returncode, proc.stderr, fragments)


def test_debug_shows_traceback_subprocess(tmp_path, trained):
    setup, fragments, before = _setup("string_in_int_id", tmp_path, trained)
    proc = subprocess.run([sys.executable, "-m", "m3bsr", *setup.argv, "--debug"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("m3bsr.errors.InputError: ") and fragments[0] in last, last
    _check_no_output(setup, before)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level module names listed by ``python -X importtime`` (lines ``import time: self | cum | name``)."""
    return {line.rsplit("|", 1)[1].strip().split(".")[0] for line in importtime_stderr.splitlines()
            if line.startswith("import time:") and line.count("|") == 2}


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "/nonexistent"], "/nonexistent: not a prepared dataset (no manifest.json)"),
    (["train", "--resume", "/nonexistent"], "/nonexistent: run directory not found"),
    (["train", "--config", "/nonexistent.yaml"], "/nonexistent.yaml: file not found"),
    (["train", "--model", "nosuch"], "model 'nosuch': unknown model"),
    (["evaluate", "/nonexistent"], "/nonexistent: run directory not found"),
    (["model-summary", "--dataset", "/nonexistent"], "not a prepared dataset"),
    (["compare", "--dataset", "/nonexistent", "--out", "/nonexistent/out"], "not a prepared dataset"),
    (["sweep", "--dataset", "/nonexistent", "--model", "pop", "--grid", "seed=1,2", "--out", "/nonexistent/out"],
     "not a prepared dataset"),
    (["experiment", "ablation", "--dataset", "/nonexistent", "--out", "/nonexistent/out"], "not a prepared dataset"),
    (["recommend", "/nonexistent", "--user", "1"], "/nonexistent: run directory not found"),
    (["export", "/nonexistent", "--what", "items", "--out", "/nonexistent/x.parquet"], "run directory not found"),
    (["serve", "/nonexistent"], "/nonexistent: run directory not found"),
    (["prepare", "--inspect", "/nonexistent"], "not a prepared dataset"),
    (["features", "text", "/nonexistent.csv", "--out", "/nonexistent/x.npy"], "item table not found"),
    (["features", "image", "/nonexistent", "--out", "/nonexistent/x.npy"], "image folder not found"),
])
def test_path_errors_answer_before_torch_is_imported(argv, message):
    """A missing path, file or model name is reported before torch or pandas is imported (the import alone
    costs seconds and ~300 MB): the real entry point, with -X importtime listing every import."""
    _assert_answers_before_torch(argv, message)


def _assert_answers_before_torch(argv: list[str], message: str) -> None:
    """``python -X importtime -m m3bsr ARGV`` exits 2 with one stderr line holding ``message``, and neither
    torch nor pandas was imported."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "m3bsr", *argv], capture_output=True,
                          text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    imported = _imported(proc.stderr)
    assert "m3bsr" in imported  # the listing is real
    assert not imported & {"torch", "pandas"}, sorted(imported & {"torch", "pandas"})


@pytest.mark.parametrize("argv, message", [
    (["train", "--dataset", "{ds}", "--set", "model.no_meiee=true"],
     "config + --set: unknown config key 'model.no_meiee'. Did you mean model.no_meie?"),
    (["train", "--dataset", "{ds}", "--set", "train.max_epoch=3"],
     "config + --set: unknown config key 'train.max_epoch'. Did you mean train.max_epochs?"),
    (["train", "--dataset", "{ds}", "--model", "sasrec", "--set", "model.no_meie=true"],
     "config key 'model.no_meie' does not apply to model 'sasrec'. Only model m3bsr has it"),
    (["train", "--dataset", "{ds}", "--set", "model.no_meie=true"],  # M3BSRConfig's validator, default preset
     "no_meie is the paper's ablation (common_expert=cross)"),
    (["train", "--dataset", "{ds}", "--set", "model.preset=paper", "--set", "model.infer_steps=50"],
     "infer_steps 50 exceeds min(T_m, T_b) = 10"),
    (["train", "--dataset", "{ds}", "--config", "{tmp}/run.yaml"],
     "unknown config key 'train.lrr'. Did you mean train.lr?"),
    (["train", "--resume", "{pop}", "--set", "train.max_epoch=3"], "unknown config key 'train.max_epoch'"),
    (["evaluate", "{pop}", "--set", "eval.kss=[5]"], "unknown config key 'eval.kss'. Did you mean eval.ks?"),
    (["model-summary", "--dataset", "{ds}", "--set", "model.hidden_sise=8"], "unknown config key 'model.hidden_sise'"),
    (["compare", "--dataset", "{ds}", "--models", "pop,sasrec", "--seeds", "0", "--set", "model.n_layer=1",
      "--out", "{tmp}/out"], "model.n_layer: no listed model has this key"),
    (["compare", "--dataset", "{ds}", "--models", "pop,sasrec", "--seeds", "0", "--set", "train.max_epoch=1",
      "--out", "{tmp}/out"], "unknown config key 'train.max_epoch'"),
    (["sweep", "--dataset", "{ds}", "--model", "sasrec", "--grid", "model.dropout=0.1,0.2", "--set",
      "train.lrr=0.1", "--out", "{tmp}/out"], "unknown config key 'train.lrr'"),
    (["sweep", "--dataset", "{ds}", "--model", "sasrec", "--grid", "model.hidden_size=8,0", "--out", "{tmp}/out",
      "--overwrite"], "config key 'model.hidden_size': Input should be greater than or equal to 1 (got 0)"),  # 2nd point
    (["experiment", "ablation", "--dataset", "{ds}", "--out", "{tmp}/out", "--set", "train.max_epoch=1"],
     "unknown config key 'train.max_epoch'"),
    (["experiment", "coldstart", "--dataset", "{ds}", "--out", "{tmp}/out", "--set", "coldstart.max_trains=3"],
     "--set coldstart.max_trains: Extra inputs are not permitted"),
])
def test_config_errors_answer_before_torch_is_imported(argv, message, trained, tmp_path):
    """A misspelt config key (``--set``, ``--config``, a grid point, an experiment setting), another model's
    key or a value a validator refuses is reported before torch or pandas is imported, by every command
    that builds run configs; nothing is written or deleted (not even by sweep --overwrite)."""
    (tmp_path / "run.yaml").write_text("train:\n  lrr: 0.1\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine\n")
    places = {"ds": trained["dataset"], "pop": trained["pop"], "tmp": tmp_path}
    _assert_answers_before_torch([a.format(**places) for a in argv], message)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
