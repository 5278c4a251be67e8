"""M3BSR: multi-modal multi-behavior sequential recommendation with conditional diffusion-based
feature denoising (Cui et al., SIGIR 2025) — the paper's Eq. 3-25 assembled (spec sections 2-4).

Pipeline per user window (one pass gives every query, spec 2a):
input layer (Eq. 3-5) → CDMD-M (Eq. 6-10) → CDMD-B (Eq. 11-13) → MEIE (Eq. 14-22) →
prediction (Eq. 23-24); total loss Eq. 25. Modalities are ``id`` plus whatever content features
the catalogue has (``image``, ``text``; none for id-only data, which turns CDMD-M off).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from m3bsr.batch import PAD, PAD_TIME, Catalogue, SequenceBatch
from m3bsr.config import BaseModelConfig
from m3bsr.errors import input_error
from m3bsr.models.base import SequentialRecommender
from m3bsr.models.denoiser import BehaviorDenoiser, ModalityDenoiser
from m3bsr.models.diffusion import NoiseSchedule
from m3bsr.models.experts import MultiExpertInterestExtractor, causal_mean_pool
from m3bsr.models.layers import FastDropout


class M3BSRConfig(BaseModelConfig):
    """Every FLAG and DECIDED choice of the spec, and the five ablations of Figure 3."""

    name: Literal["m3bsr"] = "m3bsr"
    id_dim: int = Field(16, ge=1, description="item id embedding width before the MLP (paper: 16)")
    side_dim: int = Field(16, ge=1, description="width of each side-id table (brand, seller...)")
    max_positions: int = Field(200, ge=1, description="size of the position tables (>= data.max_len)")
    T_m: int = Field(10, ge=1, description="diffusion steps of CDMD-M")
    T_b: int = Field(10, ge=1, description="diffusion steps of CDMD-B")
    infer_steps: int | None = Field(None, ge=1, description="K: reverse steps / x0 step; None = each T")
    beta_start: float = Field(1e-3, gt=0, lt=1)
    beta_end: float = Field(1e-1, gt=0, lt=1)
    diffusion_loss: Literal["eps", "literal"] = "eps"
    denoise_output: Literal["reverse_chain", "x0", "none"] = "x0"
    contrast: Literal["disentangle", "literal"] = "disentangle"
    fusion: Literal["gate", "router"] = "gate"
    scorer: Literal["linear", "tied"] = "linear"
    share_specific_experts: bool = True
    lambda_c: float = Field(0.05, ge=0)
    lambda_m: float = Field(0.02, ge=0)
    lambda_b: float = Field(0.02, ge=0)
    tau: float = Field(0.3, gt=0)
    no_cdmd_m: bool = False
    no_cdmd_b: bool = False
    no_meie: bool = False
    no_shared_expert: bool = False
    no_disentangle: bool = False
    length_buckets: int = Field(4, ge=1, description="MEIE runs windows in up to this many groups of similar "
                                "length, each trimmed to its longest window (speed only; 1 = one group)")

    @model_validator(mode="after")
    def _check(self) -> "M3BSRConfig":
        if self.beta_start > self.beta_end:
            raise ValueError(f"beta_start {self.beta_start} > beta_end {self.beta_end}")
        if self.infer_steps is not None and self.infer_steps > min(self.T_m, self.T_b):
            raise ValueError(f"infer_steps {self.infer_steps} exceeds min(T_m, T_b) = {min(self.T_m, self.T_b)}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by n_heads {self.n_heads}")
        return self


class ItemInput(nn.Module):
    """Input layer (Eq. 3-5): per-item vectors of every modality, [*] item ids → [*, d].

    ``id``: id embedding (``id_dim``) ⊕ side-id embeddings (``side_dim`` each) → MLP → d (Eq. 3-4).
    Content modality m: frozen feature → Linear → d (Eq. 5); items without a feature read a
    learned "missing" vector.
    """

    def __init__(self, cfg: M3BSRConfig, catalogue: Catalogue):
        super().__init__()
        d = cfg.hidden_size
        self.id_emb = nn.Embedding(catalogue.n_items + 1, cfg.id_dim, padding_idx=PAD)
        self.sides = list(catalogue.side_ids)
        self.side_emb = nn.ModuleDict({s: nn.Embedding(catalogue.side_sizes[s], cfg.side_dim, padding_idx=PAD)
                                       for s in self.sides})
        for s in self.sides:
            self.register_buffer(f"side_{s}", catalogue.side_ids[s].long(), persistent=False)
        self.id_mlp = nn.Sequential(nn.Linear(cfg.id_dim + len(self.sides) * cfg.side_dim, d), nn.GELU(),
                                    nn.Linear(d, d))
        self.content = list(catalogue.features)
        self.proj = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in catalogue.features.items()})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in self.content})
        for m in self.content:  # frozen features travel with the model, outside checkpoints
            self.register_buffer(f"feat_{m}", catalogue.features[m].float(), persistent=False)
            self.register_buffer(f"has_{m}", catalogue.feature_masks[m].bool(), persistent=False)

    def id_repr(self, items: Tensor) -> Tensor:
        parts = [self.id_emb(items)] + [self.side_emb[s](getattr(self, f"side_{s}")[items]) for s in self.sides]
        return self.id_mlp(torch.cat(parts, -1))

    def content_repr(self, m: str, items: Tensor) -> Tensor:
        x = self.proj[m](getattr(self, f"feat_{m}")[items])
        return torch.where(getattr(self, f"has_{m}")[items].unsqueeze(-1), x, self.missing[m].to(x.dtype))

    def forward(self, items: Tensor) -> dict[str, Tensor]:
        return {"id": self.id_repr(items), **{m: self.content_repr(m, items) for m in self.content}}


def _pad_to(x: Tensor, L: int, value: int) -> Tensor:
    return F.pad(x, (0, L - x.shape[1]), value=value)


class M3BSR(SequentialRecommender):
    """The assembled model. ``represent`` = the all-targets pass (spec 2a);
    ``represent_reference`` = one leak-free sub-window per query (for tests)."""

    config_class = M3BSRConfig

    def __init__(self, cfg: M3BSRConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d, h, p = cfg.hidden_size, cfg.n_heads, cfg.dropout
        self.input = ItemInput(cfg, catalogue)
        self.modalities = ["id"] + self.input.content
        self.pos_aux = nn.Embedding(cfg.max_positions, d)  # learned positions per behavior sequence
        self.pos_tgt = nn.Embedding(cfg.max_positions, d)
        self.behavior = nn.Embedding(catalogue.n_behaviors + 1, d, padding_idx=PAD)  # merged auxiliaries
        self.drop = FastDropout(p)
        # One schedule object per distinct T, shared by all denoisers with that T (spec 3).
        self.schedules = nn.ModuleDict({str(T): NoiseSchedule(T, cfg.beta_start, cfg.beta_end)
                                        for T in sorted({cfg.T_m, cfg.T_b})})
        common = dict(d=d, n_heads=h, dropout=p, diffusion_loss=cfg.diffusion_loss,
                      denoise_output=cfg.denoise_output)
        self.cdmd_m = None
        if self.input.content and not cfg.no_cdmd_m:
            self.cdmd_m = ModalityDenoiser(self.input.content, schedule=self.schedules[str(cfg.T_m)],
                                           infer_steps=cfg.infer_steps or cfg.T_m, **common)
        self.cdmd_b = None
        if not cfg.no_cdmd_b:
            self.cdmd_b = BehaviorDenoiser(self.modalities, schedule=self.schedules[str(cfg.T_b)],
                                           infer_steps=cfg.infer_steps or cfg.T_b, **common)
        self.meie = None
        if not cfg.no_meie:
            self.meie = MultiExpertInterestExtractor(
                self.modalities, d, cfg.n_layers, h, p, share_specific=cfg.share_specific_experts,
                use_common=not cfg.no_shared_expert, fusion=cfg.fusion, contrast=cfg.contrast, tau=cfg.tau,
                length_buckets=cfg.length_buckets)
        self.use_contrast = self.meie is not None and not cfg.no_disentangle
        if cfg.scorer == "linear":  # Eq. 23: p(i | y) = softmax(W y + b)
            self.out = nn.Linear(d, catalogue.n_items + 1)
        else:  # tied: dot product with the item id representations, plus a bias
            self.out_bias = nn.Parameter(torch.zeros(catalogue.n_items + 1))

    # ------------------------------------------------------------------------------ forward
    def _inputs(self, batch: SequenceBatch) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
        """Eq. 3-5 plus positions: streams padded to one length L → aux/tgt dicts of [B, L, d], times [B, L]."""
        L = max(batch.aux_items.shape[1], batch.tgt_items.shape[1])
        if L > self.cfg.max_positions:
            raise input_error("config key model.max_positions",
                              f"sequence length {L} exceeds max_positions={self.cfg.max_positions}",
                              f"Set --set model.max_positions={L} or lower data.max_len")
        aux_items, tgt_items = _pad_to(batch.aux_items, L, PAD), _pad_to(batch.tgt_items, L, PAD)
        aux_beh = _pad_to(batch.aux_behaviors, L, PAD)
        aux_times, tgt_times = _pad_to(batch.aux_times, L, PAD_TIME), _pad_to(batch.tgt_times, L, PAD_TIME)
        pos = torch.arange(L, device=aux_items.device)  # left-aligned: counted from the window start
        extra_aux = self.pos_aux(pos) + self.behavior(aux_beh)  # [B, L, d]
        extra_tgt = self.pos_tgt(pos)  # [L, d]
        aux = {m: self.drop(x + extra_aux) for m, x in self.input(aux_items).items()}
        tgt = {m: self.drop(x + extra_tgt) for m, x in self.input(tgt_items).items()}
        return aux, tgt, aux_times, tgt_times

    def _forward(self, batch: SequenceBatch, need_loss: bool) -> tuple[Tensor, dict[str, Tensor], tuple]:
        """→ reps [B, P, d], weighted auxiliary loss terms, (experts pass 1, pass 2) or ()."""
        cfg = self.cfg
        aux, tgt, aux_times, tgt_times = self._inputs(trim_padding(batch))
        terms: dict[str, Tensor] = {}
        if self.cdmd_m is not None:  # Eq. 6-10
            aux_c, tgt_c, loss_m = self.cdmd_m(aux, tgt, aux_times, tgt_times, need_loss)
            aux, tgt = {**aux, **aux_c}, {**tgt, **tgt_c}
            if need_loss:
                terms["diff_m"] = cfg.lambda_m * loss_m
        if self.cdmd_b is not None:  # Eq. 11-13
            aux_b, loss_b = self.cdmd_b(aux, tgt, aux_times, tgt_times, need_loss)
            aux = {**aux, **aux_b}
            if need_loss:
                terms["diff_b"] = cfg.lambda_b * loss_b
        q = batch.query_times
        if self.meie is None:  # w/o MEIE: causal mean of the 2M sequences, averaged
            pooled = [causal_mean_pool(s[m], t, q) for s, t in ((aux, aux_times), (tgt, tgt_times))
                      for m in self.modalities]
            return torch.stack(pooled).mean(0), terms, ()
        two = need_loss and self.use_contrast and cfg.contrast == "disentangle"
        if two:  # NOTE: contrast DECIDED (spec 2.4) — a second dropout pass through the experts (the
            # denoised tokens are shared) gives the InfoNCE positives of Eq. 20; both passes run as 2B windows.
            B = q.shape[0]
            cat2 = lambda d_: {m: torch.cat([x, x]) for m, x in d_.items()}  # noqa: E731
            experts = self.meie(cat2(aux), cat2(tgt), torch.cat([aux_times] * 2), torch.cat([tgt_times] * 2),
                                torch.cat([q, q]))
            pair = (experts[:B], experts[B:])
        else:
            experts = self.meie(aux, tgt, aux_times, tgt_times, q)
            pair = (experts, None)
        return self.meie.fuse(pair[0]), terms, pair

    def represent(self, batch: SequenceBatch) -> Tensor:
        """[B, P, d]: the fused interest y (Eq. 22) at every query, in one pass per window."""
        return self._forward(batch, need_loss=False)[0]

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        if self.cfg.scorer == "linear":
            return self.out.weight, self.out.bias
        items = torch.arange(self.n_items + 1, device=self.out_bias.device)
        return self.input.id_repr(items), self.out_bias

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Eq. 25, each term already weighted: ``main`` (Eq. 24), ``contrast`` (λ_c, Eq. 20),
        ``diff_m`` (λ_m, Eq. 10), ``diff_b`` (λ_b, Eq. 13); absent modules give absent terms."""
        reps, terms, pair = self._forward(batch, need_loss=True)
        out = {"main": self.main_loss(reps, batch), **terms}
        if self.use_contrast:
            mask = batch.query_mask
            window = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
            e2 = pair[1][mask] if pair[1] is not None else None
            out["contrast"] = self.cfg.lambda_c * self.meie.contrast_loss(pair[0][mask], e2, window)
        return out

    # ------------------------------------------------------------------------------ reference path
    @torch.no_grad()
    def represent_reference(self, batch: SequenceBatch, chunk: int = 512) -> Tensor:
        """Spec 2a reference: for every query, a sub-window with only the events strictly before it
        (a prefix of each left-aligned stream), run alone. Slow (one window per query); [B, P, d]."""
        b_idx, p_idx = batch.query_mask.nonzero(as_tuple=True)
        qt = batch.query_times[b_idx, p_idx].unsqueeze(1)  # [N, 1]
        keep_a = batch.aux_times[b_idx] < qt  # [N, La]
        keep_t = batch.tgt_times[b_idx] < qt
        sub = SequenceBatch(
            users=batch.users[b_idx],
            aux_items=batch.aux_items[b_idx].where(keep_a, PAD),
            aux_behaviors=batch.aux_behaviors[b_idx].where(keep_a, PAD),
            aux_times=batch.aux_times[b_idx].where(keep_a, PAD_TIME),
            tgt_items=batch.tgt_items[b_idx].where(keep_t, PAD),
            tgt_times=batch.tgt_times[b_idx].where(keep_t, PAD_TIME),
            query_times=qt, labels=batch.labels[b_idx, p_idx].unsqueeze(1))
        reps = torch.cat([self.represent(_rows(sub, s, s + chunk)) for s in range(0, len(b_idx), chunk)])
        out = reps.new_zeros(*batch.labels.shape, reps.shape[-1])
        out[b_idx, p_idx] = reps[:, 0]
        return out


def trim_padding(batch: SequenceBatch) -> SequenceBatch:
    """Drop the padding columns every window of ``batch`` has in both streams (exact: padding is
    masked everywhere and positions count from the left). Windows are built ``max_len`` wide but
    most real windows are far shorter (tmall-like data: ~9 % of the slots are events)."""
    n = int(torch.maximum((batch.aux_times < PAD_TIME).sum(1), (batch.tgt_times < PAD_TIME).sum(1)).max()) \
        if batch.users.numel() else 0
    L = max(n, 1)
    if L >= max(batch.aux_items.shape[1], batch.tgt_items.shape[1]):
        return batch
    cut = {k: getattr(batch, k)[:, :L] for k in ("aux_items", "aux_behaviors", "aux_times", "tgt_items", "tgt_times")}
    return replace(batch, **cut)


def _rows(batch: SequenceBatch, lo: int, hi: int) -> SequenceBatch:
    return SequenceBatch(**{k: (v[lo:hi] if v is not None else None) for k, v in vars(batch).items()})
