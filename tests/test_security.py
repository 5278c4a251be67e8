"""Tampered files never run code: checkpoints load with ``weights_only=True``; configs and metadata are
YAML (safe loader) / JSON / NumPy without pickle. The source tree is scanned (AST, not regex), and a
checkpoint or config carrying a Python object is refused with one line through the real CLI."""

from __future__ import annotations

import ast
import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from factories import make_tiny_prepared

from m3bsr.cli import main as cli_main
from m3bsr.engine.checkpoint import load_checkpoint, save_checkpoint
from m3bsr.errors import InputError

SRC = Path(__file__).resolve().parents[1] / "src" / "m3bsr"
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
UNSAFE_CALLS = {"unsafe_load", "full_load", "read_pickle", "to_pickle", "unsafe_load_all", "full_load_all"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            yield owner, node.func.attr, {k.arg: k.value for k in node.keywords}, node


def _const(node) -> object:
    return node.value if isinstance(node, ast.Constant) else "<not a constant>"


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20, files  # the scan really sees the package
    return files


def scan(source: str, name: str) -> tuple[list[str], int]:
    """Unsafe deserialization in ``source``: (problems, number of torch.load calls)."""
    tree = ast.parse(source, filename=name)
    problems, torch_loads = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bad = [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            bad = [node.module] if (node.module or "").split(".")[0] in PICKLE_MODULES else []
        else:
            continue
        problems += [f"{name}:{node.lineno}: imports {b}" for b in bad]
    for owner, attr, kw, node in _calls(tree):
        where = f"{name}:{node.lineno}"
        if owner == "torch" and attr == "load":
            torch_loads += 1
            if _const(kw.get("weights_only")) is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
        if owner == "yaml" and attr in ("load", "load_all"):
            loader = kw.get("Loader")
            if not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                problems.append(f"{where}: yaml.{attr} without the SafeLoader")
        if attr in UNSAFE_CALLS:
            problems.append(f"{where}: {owner}.{attr}")
        if "allow_pickle" in kw and _const(kw["allow_pickle"]) is not False:
            problems.append(f"{where}: allow_pickle={ast.unparse(kw['allow_pickle'])}")
    return problems, torch_loads


def test_every_load_in_the_source_tree_is_safe():
    problems, torch_loads = [], 0
    for path in _sources():
        found, n = scan(path.read_text(), str(path.relative_to(SRC)))
        problems += found
        torch_loads += n
    assert torch_loads >= 2  # checkpoint.py and the image encoder's weights
    assert not problems, problems


def test_the_scan_catches_unsafe_code():
    """The scanner is not vacuous: each unsafe pattern is flagged, the safe forms are not."""
    bad = ("import pickle\nfrom dill import loads\nimport torch, yaml, numpy as np\ntorch.load(f)\n"
           "torch.load(f, weights_only=False)\nyaml.load(s)\nyaml.load(s, Loader=yaml.Loader)\n"
           "np.load(p, allow_pickle=True)\nyaml.unsafe_load(s)\npd.read_pickle(p)\n")
    problems, n = scan(bad, "bad.py")
    assert n == 2 and len(problems) == 9, problems
    good = ("import torch, yaml, numpy as np\ntorch.load(f, weights_only=True)\nyaml.safe_load(s)\n"
            "yaml.load(s, Loader=yaml.SafeLoader)\nnp.load(p, allow_pickle=False)\nnp.load(p)\n")
    assert scan(good, "good.py") == ([], 1)


# --------------------------------------------------------------------------- pickled checkpoints


class Payload:
    """Unpickling this would create ``marker`` (proof that code ran)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class Innocent:
    """A plain Python object: harmless, but still not allowed in a checkpoint."""

    def __init__(self):
        self.x = 1


def _forge(path: Path, obj, model_state: dict) -> None:
    """What an attacker can do: write any pickle AND a matching sha256 sidecar; remove the fallback."""
    torch.save({"model": model_state, "x": obj}, path)
    (path.parent / f"{path.name}.sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    for p in path.parent.glob(f"{path.stem}.prev.pt*"):
        p.unlink()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sec")
    ds = make_tiny_prepared(root / "ds", n_users=20, n_items=30)
    run = root / "run"
    assert cli_main(["train", "--dataset", str(ds), "--model", "sasrec", "--out", str(run), "--quiet", "--device",
                     "cpu", "--set", "train.max_epochs=1", "--set", "model.hidden_size=8",
                     "--set", "model.n_layers=1"]) == 0
    return run


@pytest.mark.parametrize("obj", ["payload", "innocent"])
@pytest.mark.parametrize("command", ["evaluate", "resume"])
def test_checkpoint_with_a_pickled_object_is_refused(trained_run, tmp_path, capsys, obj, command):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "PWNED"
    name = "best.pt" if command == "evaluate" else "last.pt"
    state = load_checkpoint(run / name)["model"]
    _forge(run / name, Payload(marker) if obj == "payload" else Innocent(), state)
    argv = ["evaluate", str(run), "--quiet"] if command == "evaluate" else ["train", "--resume", str(run), "--quiet"]
    rc = cli_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1, err
    msg = err[0]
    assert msg.startswith(f"m3bsr: error: {run / name}: no usable checkpoint ({name}: refused: it carries a pickled "
                          "Python object ("), msg
    assert ("io.open)" if obj == "payload" else "Innocent)") in msg  # the refused global is named
    assert "weights_only=False" not in msg  # never advise the unsafe way out
    assert "Re-train the run, or restore the file" in msg
    assert not marker.exists()  # the payload never ran


def test_pickled_object_with_a_good_previous_falls_back(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"epoch": 1, "model": {"w": torch.ones(2)}})
    save_checkpoint(path, {"epoch": 2, "model": {"w": torch.zeros(2)}})
    marker = tmp_path / "PWNED"
    torch.save({"epoch": 3, "x": Payload(marker)}, path)
    (tmp_path / "last.pt.sha256").write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "  last.pt\n")
    with pytest.warns(UserWarning, match="refused: it carries a pickled Python object.*last.prev.pt"):
        assert load_checkpoint(path)["epoch"] == 1
    assert not marker.exists()


def test_tampered_checkpoint_without_matching_sidecar_is_not_even_unpickled(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint(path, {"epoch": 1})
    marker = tmp_path / "PWNED"
    torch.save({"x": Payload(marker)}, path)  # sidecar still holds the old digest
    with pytest.raises(InputError, match="sha256 mismatch"):
        load_checkpoint(path)
    assert not marker.exists()


# --------------------------------------------------------------------------- YAML/JSON with Python tags


TAG = '!!python/object/apply:os.system ["touch {marker}"]'


@pytest.mark.parametrize("where", ["run_config", "config_flag"])
def test_yaml_python_tags_are_refused_in_one_line(trained_run, tmp_path, capsys, where):
    marker = tmp_path / "PWNED"
    if where == "run_config":
        run = tmp_path / "run"
        shutil.copytree(trained_run, run)
        (run / "config.yaml").write_text((run / "config.yaml").read_text() + f"extra: {TAG.format(marker=marker)}\n")
        argv, expect = ["evaluate", str(run), "--quiet"], f"{run / 'config.yaml'}:"
    else:
        cfg = tmp_path / "evil.yaml"
        cfg.write_text(f"train: {TAG.format(marker=marker)}\n")
        argv = ["train", "--dataset", str(trained_run.parent / "ds"), "--model", "pop", "--config", str(cfg), "--out",
                str(tmp_path / "out"), "--quiet"]
        expect = f"{cfg}:1: not valid YAML"
    rc = cli_main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and expect in err[0], err
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name,text,expect", [
    ("metrics.jsonl", '{"epoch": 1', "metrics.jsonl line 1: invalid JSON"),
    ("config.yaml", "- a list\n- not a config\n", "config.yaml: not a mapping of config sections"),
])
def test_damaged_run_metadata_is_one_line(trained_run, tmp_path, capsys, name, text, expect):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / name).write_text(text)
    rc = cli_main(["train", "--resume", str(run), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and expect in err[0], err


def yaml_parsers(source: str, name: str) -> list[str]:
    """Every place in ``source`` that parses YAML itself (``yaml.*load*``), outside ``parse_yaml``."""
    tree = ast.parse(source, filename=name)
    allowed = {id(n) for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "parse_yaml"
               for n in ast.walk(f)}
    return [f"{name}:{node.lineno}: yaml.{attr}" for owner, attr, _, node in _calls(tree)
            if owner == "yaml" and "load" in attr and id(node) not in allowed]


def test_yaml_is_parsed_in_one_function():
    """m3bsr.config.parse_yaml (under read_yaml) is the one place YAML is parsed, in the package and the
    benchmarks; the scan is not vacuous."""
    found = [p for path in [*_sources(), *sorted((SRC.parents[1] / "benchmarks").glob("*.py"))]
             for p in yaml_parsers(path.read_text(), path.name)]
    assert not found, found
    assert yaml_parsers((SRC / "config.py").read_text().replace("def parse_yaml(", "def other("), "config.py")
    assert yaml_parsers("import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\n", "x.py") == [
        "x.py:2: yaml.safe_load", "x.py:3: yaml.load"]


@pytest.mark.parametrize("text, message", [
    ("train:\n  lr: [1\n",
     r"^cfg\.yaml:3: not valid YAML \(expected ',' or '\]', but got '<stream end>'\)\. Fix the syntax$"),
    ("- a list\n", r"^cfg\.yaml: not a mapping of config sections\. Write it as sections of KEY: VALUE lines$"),
    (None, r"^cfg\.yaml: file not found\. Check the path$"),
    ("x: {TAG}\n", r"^cfg\.yaml:1: not valid YAML \(could not determine a constructor for the tag "
                   r"'tag:yaml\.org,2002:python/object/apply:os\.system'; Python tags are never loaded\)"),
])
def test_read_yaml_errors_are_one_line_naming_file_and_line(tmp_path, monkeypatch, text, message):
    from m3bsr.config import read_yaml

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    if text is not None:
        Path("cfg.yaml").write_text(text.replace("{TAG}", TAG.format(marker=marker)))
    with pytest.raises(InputError, match=message):
        read_yaml("cfg.yaml")
    assert not marker.exists()
    Path("cfg.yaml").write_text("")
    assert read_yaml("cfg.yaml") == {} and read_yaml("cfg.yaml", mapping=False) is None
