"""M3BSR: multi-modal multi-behavior sequential recommendation with conditional diffusion-based
feature denoising (Cui et al., SIGIR 2025) — the paper's Eq. 3-25 assembled (docs/model.md).

Pipeline per user window (one pass gives every query, docs/architecture.md "Time and causality"):
input layer (Eq. 3-5) → CDMD-M (Eq. 6-10) → CDMD-B (Eq. 11-13) → MEIE (Eq. 14-22) →
prediction (Eq. 23-24); total loss Eq. 25. Modalities are ``id`` plus whatever content features
the catalogue has (``image``, ``text``; none for id-only data, which turns CDMD-M off).

Two presets (``model.preset``, docs/model.md "presets"): ``paper`` is the printed architecture;
``default`` is a strong sequential backbone — a causal Transformer over both behavior streams
merged by time, with one full-width item table (id + content) shared by input and scoring —
plus a repeat head. The paper's parts (denoisers, specific experts, disentanglement) join it as
branches whose gates start at zero with ``no_specific_experts=false``; they are off by default
because on validation they did not pay for their 1.6-4.5x cost (docs/results.md "ladder").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import PAD, PAD_TIME, Catalogue, SequenceBatch
from m3bsr.errors import input_error
from m3bsr.models.base import SINGLE_BEHAVIOR_MODE, DataMode, SequentialRecommender, with_aux_queries
from m3bsr.models.configs import M3BSRConfig
from m3bsr.models.denoiser import BehaviorDenoiser, ModalityDenoiser, ModalityMLP
from m3bsr.models.diffusion import NoiseSchedule
from m3bsr.models.experts import MultiExpertInterestExtractor, causal_mean_pool
from m3bsr.models.layers import (FastDropout, TransformerEncoder, check_positions, latest_index_before,
                                 merge_by_time, or_null, time_mask)
from m3bsr.models.repeat import RepeatHead


TABLE_STD = 0.02
"""Initial std of every learned table added to item vectors (ids, positions, behaviors).

NOTE (docs/model.md "initialisation"): PyTorch's N(0, 1) default made the position and behavior
rows dwarf the item part (two different items at one position: cosine 0.96 at initialisation)."""


class ItemInput(nn.Module):
    """Input layer (Eq. 3-5): per-item vectors of every modality, [*] item ids → [*, d].

    ``id`` (``id_input``): ``mlp16`` = id embedding (``id_dim``) ⊕ side-id embeddings (``side_dim``
    each) → MLP → d (Eq. 3-4); ``full`` = one d-wide id table (+ d-wide side-id tables).
    Content modality m: frozen feature → Linear → d (Eq. 5); items without a feature read a
    learned "missing" vector. ``feature_norm="standardize"`` z-scores each feature dimension over
    the catalogue's items first (features such as CNN activations share one large mean direction),
    divides by the width and starts the projection at the id table's scale. :meth:`item_vector` is the item's single
    vector (id + content with ``item_content``, the content part behind a zero-initialised [d] gate
    with ``content_gate``), used by the merged backbone and the tied scorer.
    """

    def __init__(self, cfg: M3BSRConfig, catalogue: Catalogue):
        super().__init__()
        d = cfg.hidden_size
        self.full = cfg.id_input == "full"
        self.item_content = cfg.item_content and bool(catalogue.features)
        self.content_gate = nn.Parameter(torch.zeros(d)) if self.item_content and cfg.content_gate else None
        width, side_width = (d, d) if self.full else (cfg.id_dim, cfg.side_dim)
        self.id_emb = nn.Embedding(catalogue.n_items + 1, width, padding_idx=PAD)
        self.sides = list(catalogue.side_ids)
        self.side_emb = nn.ModuleDict({s: nn.Embedding(catalogue.side_sizes[s], side_width, padding_idx=PAD)
                                       for s in self.sides})
        if self.full:  # added straight to positions and behaviors: the same small scale
            for table in [self.id_emb, *self.side_emb.values()]:
                _init_table(table)
        # NOTE (docs/model.md "initialisation"): tables that feed the id MLP keep unit scale; at 0.02
        # the MLP's biases would make every item the same vector (cosine 0.9997 at initialisation).
        for s in self.sides:
            self.register_buffer(f"side_{s}", catalogue.side_ids[s].long(), persistent=False)
        self.id_mlp = None
        if not self.full:
            self.id_mlp = nn.Sequential(nn.Linear(cfg.id_dim + len(self.sides) * cfg.side_dim, d), nn.GELU(),
                                        nn.Linear(d, d))
        self.content = list(catalogue.features)
        self.proj = nn.ModuleDict({m: nn.Linear(x.shape[1], d) for m, x in catalogue.features.items()})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * TABLE_STD) for m in self.content})
        for m in self.content:  # frozen features travel with the model, outside checkpoints
            feat, has = catalogue.features[m].float(), catalogue.feature_masks[m].bool()
            if cfg.feature_norm == "standardize":
                # NOTE (docs/model.md "content features"): z-scored, then divided by the width D, with
                # the weights at std 0.02·√D: the projection starts at the id table's scale (0.02) and
                # an Adam step moves it about as far as it moves an id row. Unscaled, the D coherent
                # per-weight steps moved content vectors ~√D times faster and training diverged.
                D = feat.shape[1]
                feat = _standardize(feat, has) / D
                nn.init.normal_(self.proj[m].weight, std=TABLE_STD * D ** 0.5)
                nn.init.zeros_(self.proj[m].bias)
            self.register_buffer(f"feat_{m}", feat, persistent=False)
            self.register_buffer(f"has_{m}", has, persistent=False)

    def id_repr(self, items: Tensor) -> Tensor:
        """Eq. 3-4: [*] → [*, d]."""
        parts = [self.id_emb(items)] + [self.side_emb[s](getattr(self, f"side_{s}")[items]) for s in self.sides]
        if self.full:
            return sum(parts)
        return self.id_mlp(torch.cat(parts, -1))

    def content_repr(self, m: str, items: Tensor) -> Tensor:
        """Eq. 5: [*] → [*, d]."""
        x = self.proj[m](getattr(self, f"feat_{m}")[items])
        return torch.where(getattr(self, f"has_{m}")[items].unsqueeze(-1), x, self.missing[m].to(x.dtype))

    def forward(self, items: Tensor) -> dict[str, Tensor]:
        """Every modality's vector: {m: [*, d]}."""
        return {"id": self.id_repr(items), **{m: self.content_repr(m, items) for m in self.content}}

    def item_vector(self, items: Tensor) -> Tensor:
        """One vector per item: id, plus every content modality when ``item_content``. [*] → [*, d]."""
        x = self.id_repr(items)
        if not self.item_content:
            return x
        content = sum(self.content_repr(m, items) for m in self.content)
        return x + (content if self.content_gate is None else self.content_gate.to(content.dtype) * content)


def _init_table(table: nn.Embedding) -> None:
    nn.init.normal_(table.weight, std=TABLE_STD)
    if table.padding_idx is not None:
        with torch.no_grad():
            table.weight[table.padding_idx].zero_()


def _standardize(feat: Tensor, has: Tensor) -> Tensor:
    """Per-dimension z-score over the items that have a feature; rows without one stay zero.
    Shapes: ``feat`` [n_items + 1, D], ``has`` [n_items + 1] → [n_items + 1, D]."""
    if not bool(has.any()):
        return feat
    rows = feat[has]
    out = (feat - rows.mean(0)) / rows.std(0, unbiased=False).clamp(min=1e-6)
    return out * has.unsqueeze(1)


@dataclass
class M3BSROutput:
    """What one pass of :class:`M3BSR` gives (as diffusers' scheduler outputs do).

    * ``reps`` [B, P, d]: the fused interest y of Eq. 22 at every query;
    * ``terms``: the weighted auxiliary losses (``diff_m``, ``diff_b``), training only;
    * ``experts``, ``second`` [B, P, E, d] or None: the pooled expert vectors of the first and, for
      the disentanglement loss (Eq. 20), a second dropout pass.
    """

    reps: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    experts: Tensor | None = None
    second: Tensor | None = None


def _pad_to(x: Tensor, L: int, value: int) -> Tensor:
    return F.pad(x, (0, L - x.shape[1]), value=value)


class M3BSR(SequentialRecommender):
    """The assembled model. ``represent`` = the all-targets pass (docs/architecture.md);
    ``represent_reference`` = one leak-free sub-window per query (for tests)."""

    config_class = M3BSRConfig

    @classmethod
    def data_mode(cls, cfg: M3BSRConfig, catalogue: Catalogue, where: str = "the dataset") -> DataMode:
        """Multi-behavior. On a single-behavior dataset only the backbone runs (docs/model.md
        "Single-behavior datasets"): the paper's cross common expert, specific experts and CDMD-B are
        built on an auxiliary stream, so a config that has them is a one-line error naming the key."""
        parts = ("merged backbone" if cfg.no_specific_experts else
                 "backbone + specific experts" if cfg.common_expert == "merged" else "paper experts")
        if not catalogue.single_behavior:
            return DataMode(f"multi-behavior: {parts}", id_only_notice(catalogue, where))
        if cfg.common_expert == "cross":
            key, fix = (("model.preset=paper", "Use the default preset (drop model.preset=paper)")
                        if cfg.preset == "paper" else ("model.common_expert=cross", "Set model.preset=default"))
            raise input_error(key, f"the common expert attends from auxiliary to target events (Eq. 16-17) and "
                              f"{where} has no auxiliary behavior (single-behavior)",
                              f"{fix}: its merged backbone reads the target stream alone")
        if not cfg.no_specific_experts:
            raise input_error("model.no_specific_experts=false", "the specific experts and CDMD-B come in "
                              f"auxiliary/target pairs (Eq. 11-19) and {where} has no auxiliary behavior "
                              "(single-behavior)", "Set model.no_specific_experts=true (the default preset): "
                              "the merged backbone reads the target stream alone")
        return DataMode(SINGLE_BEHAVIOR_MODE, id_only_notice(catalogue, where, f"m3bsr: {where} has no auxiliary "
                        "behavior: the merged backbone reads the target stream alone; its behavior embedding and "
                        "the repeat head's behavior bias have a single behavior"))

    def __init__(self, cfg: M3BSRConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d, h, p = cfg.hidden_size, cfg.n_heads, cfg.dropout
        self.target_behavior = catalogue.target_behavior
        self.input = ItemInput(cfg, catalogue)
        self.modalities = ["id"] + self.input.content
        self.behavior = nn.Embedding(catalogue.n_behaviors + 1, d, padding_idx=PAD)  # merged auxiliaries
        _init_table(self.behavior)
        # The per-stream inputs (Eq. 5), denoisers and schedules feed the specific experts only; without
        # them the model holds no parameter that never gets a gradient.
        branches = not cfg.no_specific_experts
        if branches:
            self.pos_aux = nn.Embedding(cfg.max_positions, d)  # learned positions per behavior sequence
            self.pos_tgt = nn.Embedding(cfg.max_positions, d)
            _init_table(self.pos_aux)
            _init_table(self.pos_tgt)
        self.drop = FastDropout(p)
        self.merged = cfg.common_expert == "merged" and not cfg.no_shared_expert
        if self.merged:  # the backbone: a causal Transformer over both streams merged by time
            self.pos_merged = nn.Embedding(cfg.max_positions, d)
            _init_table(self.pos_merged)
            self.merged_ln = nn.LayerNorm(d)
            self.backbone = TransformerEncoder(d, cfg.n_layers, h, p)
            self.backbone_null = nn.Parameter(torch.randn(d) * TABLE_STD)
        # One schedule object per distinct T, shared by all denoisers with that T (docs/model.md).
        self.schedules = nn.ModuleDict({str(T): NoiseSchedule(T, cfg.beta_start, cfg.beta_end)
                                        for T in sorted({cfg.T_m, cfg.T_b})} if branches else {})
        common = dict(d=d, n_heads=h, dropout=p, diffusion_loss=cfg.diffusion_loss,
                      denoise_output=cfg.denoise_output)
        self.cdmd_m = None
        if branches and self.input.content and not cfg.no_cdmd_m and cfg.modality_denoiser == "mlp":
            self.cdmd_m = ModalityMLP(self.input.content, d)  # Figure 5's comparison: no diffusion, no loss
        elif branches and self.input.content and not cfg.no_cdmd_m:
            self.cdmd_m = ModalityDenoiser(self.input.content, schedule=self.schedules[str(cfg.T_m)],
                                           infer_steps=cfg.infer_steps or cfg.T_m, **common)
        self.cdmd_b = None
        if branches and not cfg.no_cdmd_b:
            self.cdmd_b = BehaviorDenoiser(self.modalities, schedule=self.schedules[str(cfg.T_b)],
                                           infer_steps=cfg.infer_steps or cfg.T_b, **common)
        self.meie = None
        if branches and not cfg.no_meie:
            self.meie = MultiExpertInterestExtractor(
                self.modalities, d, cfg.n_layers, h, p, share_specific=cfg.share_specific_experts,
                use_common=not cfg.no_shared_expert, fusion=cfg.fusion, contrast=cfg.contrast, tau=cfg.tau,
                length_buckets=cfg.length_buckets, own_common=not self.merged)
        self.use_contrast = self.meie is not None and not cfg.no_disentangle
        self.repeat = RepeatHead(d, catalogue.n_behaviors) if cfg.repeat else None
        if cfg.scorer == "linear":  # Eq. 23: p(i | y) = softmax(W y + b)
            self.out = nn.Linear(d, catalogue.n_items + 1)
        else:  # tied: dot product with the item vectors (ItemInput.item_vector), plus a bias
            self.out_bias = nn.Parameter(torch.zeros(catalogue.n_items + 1))

    # ------------------------------------------------------------------------------ forward
    def _inputs(self, batch: SequenceBatch) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
        """Eq. 3-5 plus positions: streams padded to one length L → aux/tgt dicts of [B, L, d], times [B, L]."""
        L = max(batch.aux_items.shape[1], batch.tgt_items.shape[1])
        check_positions(L, self.cfg.max_positions, "m3bsr")
        aux_items, tgt_items = _pad_to(batch.aux_items, L, PAD), _pad_to(batch.tgt_items, L, PAD)
        aux_beh = _pad_to(batch.aux_behaviors, L, PAD)
        aux_times, tgt_times = _pad_to(batch.aux_times, L, PAD_TIME), _pad_to(batch.tgt_times, L, PAD_TIME)
        pos = torch.arange(L, device=aux_items.device)  # left-aligned: counted from the window start
        extra_aux = self.pos_aux(pos) + self.behavior(aux_beh)  # [B, L, d]
        extra_tgt = self.pos_tgt(pos)  # [L, d]
        aux = {m: self.drop(x + extra_aux) for m, x in self.input(aux_items).items()}
        tgt = {m: self.drop(x + extra_tgt) for m, x in self.input(tgt_items).items()}
        return aux, tgt, aux_times, tgt_times

    def _merged_stream(self, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor]:
        """Both streams interleaved by time: items, behaviors, times [B, La + Lt] (padding last)."""
        return merge_by_time(batch.aux_items, batch.aux_behaviors, batch.aux_times, batch.tgt_items,
                             batch.tgt_times, self.target_behavior)

    def item_vectors(self, items: Tensor) -> Tensor:
        """``ItemInput.item_vector`` of ``items`` [*] → [*, d]. With content in the item vector and more
        tokens than the catalogue has items, the catalogue is projected once and gathered: the same
        vectors for a fraction of the FLOPs (a 1,664-d feature projected per token dominated a step)."""
        if self.input.item_content and items.numel() > self.n_items + 1:
            return self.input.item_vector(torch.arange(self.n_items + 1, device=items.device))[items]
        return self.input.item_vector(items)

    def _backbone(self, batch: SequenceBatch) -> Tensor:
        """The merged common expert: ``x_j = LN(drop(√d · e_item + pos_j + behavior_j))``, a causal
        Transformer (an event sees events up to its own time), read at the latest event strictly
        before each query (a learned null vector when there is none) → [B, P, d]."""
        items, behaviors, times = self._merged_stream(batch)
        B, L = items.shape
        check_positions(L, self.cfg.max_positions, "m3bsr")
        pos = self.pos_merged(torch.arange(L, device=items.device))  # [L, d]
        x = self.item_vectors(items) * math.sqrt(self.cfg.hidden_size) + pos + self.behavior(behaviors)
        x = self.merged_ln(self.drop(x))  # [B, L, d]
        index, found = latest_index_before(times, batch.query_times)  # [B, P]
        rows_only = not self.training and index.shape[1] < L
        h = self.backbone(x, time_mask(times, times, strict=False), index, last_only=rows_only)  # [B, P, d]
        return or_null(h, found, self.backbone_null)

    def _forward(self, batch: SequenceBatch, need_loss: bool) -> M3BSROutput:
        """The whole pass: fused interest y [B, P, d], the weighted auxiliary loss terms and, when the
        disentanglement loss needs them, the expert vectors of one or two dropout passes."""
        cfg = self.cfg
        batch = trim_padding(batch)
        q = batch.query_times
        common = self._backbone(batch) if self.merged else None  # [B, P, d]
        if self.meie is None and common is not None:  # no specific experts: the backbone alone
            return M3BSROutput(common)
        aux, tgt, aux_times, tgt_times = self._inputs(batch)  # Eq. 3-5
        terms: dict[str, Tensor] = {}
        if self.cdmd_m is not None:  # Eq. 6-10
            aux_c, tgt_c, loss_m = self.cdmd_m(aux, tgt, aux_times, tgt_times, need_loss)
            aux, tgt = {**aux, **aux_c}, {**tgt, **tgt_c}
            if loss_m is not None:  # None: the MLP in CDMD-M's place, or no loss asked
                terms["diff_m"] = cfg.lambda_m * loss_m
        if self.cdmd_b is not None:  # Eq. 11-13
            aux_b, loss_b = self.cdmd_b(aux, tgt, aux_times, tgt_times, need_loss)
            aux = {**aux, **aux_b}
            if need_loss:
                terms["diff_b"] = cfg.lambda_b * loss_b
        if self.meie is None:  # w/o MEIE: causal mean of the 2M sequences, averaged
            pooled = [causal_mean_pool(s[m], t, q) for s, t in ((aux, aux_times), (tgt, tgt_times))
                      for m in self.modalities]
            return M3BSROutput(torch.stack(pooled).mean(0), terms)
        experts = self.meie.by_length(aux, tgt, aux_times, tgt_times, q, common)  # Eq. 14-19 → [B, P, E, d]
        second = None
        if need_loss and self.use_contrast and cfg.contrast == "disentangle":
            # NOTE: contrast DECIDED (docs/model.md) — a second dropout pass through the experts (the
            # denoised tokens are shared) gives the InfoNCE positives of Eq. 20.
            common2 = self._backbone(batch) if self.merged else None
            second = self.meie.by_length(aux, tgt, aux_times, tgt_times, q, common2)
        return M3BSROutput(self.meie.fuse(experts), terms, experts, second)  # Eq. 21-22

    def represent(self, batch: SequenceBatch) -> Tensor:
        """[B, P, d]: the fused interest y (Eq. 22) at every query, in one pass per window."""
        return self._forward(batch, need_loss=False).reps

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        """Eq. 23's ``(W [n_items + 1, d], b)``: ``linear``: a Linear layer; ``tied``: the item vectors and a bias."""
        if self.cfg.scorer == "linear":
            return self.out.weight, self.out.bias
        items = torch.arange(self.n_items + 1, device=self.out_bias.device)
        return self.input.item_vector(items), self.out_bias

    def output_rows(self, items: Tensor) -> tuple[Tensor, Tensor | None]:
        """Rows of :meth:`output_layer` for ``items`` [C] → ``([C, d], [C])``; the tied scorer computes
        only those items' vectors (the sampled loss reads S + N rows, not the catalogue's content)."""
        if self.cfg.scorer == "linear":
            return self.out.weight[items], self.out.bias[items]
        return self.input.item_vector(items), self.out_bias[items]

    def history_bonus(self, reps: Tensor, batch: SequenceBatch) -> tuple[Tensor, Tensor] | None:
        """Repeat head (docs/model.md): the items of both streams before each query and their bonus,
        ``([B, P, H], [B, P, H])``; None without ``repeat``."""
        if self.repeat is None:
            return None
        items, behaviors, times = self._merged_stream(trim_padding(batch))
        bonus = self.repeat(reps, self.item_vectors(items), behaviors, times, batch.query_times)
        return items.unsqueeze(1).expand_as(bonus), bonus

    def loss(self, batch: SequenceBatch) -> dict[str, Tensor]:
        """Eq. 25, each term already weighted: ``main`` (Eq. 24), ``contrast`` (λ_c, Eq. 20),
        ``diff_m`` (λ_m, Eq. 10), ``diff_b`` (λ_b, Eq. 13) and ``aux_targets`` (λ_a, not in the paper);
        absent modules give absent terms. With ``aux_targets`` one pass serves both query sets."""
        batch = trim_padding(batch)
        P, w = batch.labels.shape[1], self.cfg.aux_targets
        out = self._forward(with_aux_queries(batch) if w > 0 else batch, need_loss=True)
        terms = (self.main_and_aux_target_loss(out.reps, batch, w) if w > 0
                 else {"main": self.main_loss(out.reps, batch)})  # Eq. 24
        terms.update(out.terms)  # Eq. 10 and 13
        if self.use_contrast:  # over the target queries only
            mask = batch.query_mask
            window = torch.arange(mask.shape[0], device=mask.device).unsqueeze(1).expand_as(mask)[mask]
            e1 = out.experts[:, :P][mask]
            e2 = out.second[:, :P][mask] if out.second is not None else None
            terms["contrast"] = self.cfg.lambda_c * self.meie.contrast_loss(e1, e2, window)  # Eq. 20
        return terms

    # ------------------------------------------------------------------------------ reference path
    @torch.no_grad()
    def represent_reference(self, batch: SequenceBatch, chunk: int = 512) -> Tensor:
        """The leak-free reference (docs/model.md "Time causality"): for every query, a sub-window with only the events strictly before it
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


def id_only_notice(catalogue: Catalogue, where: str, other: str | None = None) -> str | None:
    """``other`` (another notice, or None), joined with the notice that ``where`` has no content features
    when ``catalogue`` has none: said once, since a newcomer may not know M3BSR reads item text and images."""
    if catalogue.features:
        return other
    notice = (f"{where} has no content features, so the model runs id-only (item ids and behaviors, no text or "
              "image). To add them, prepare the data with --set features.text=FILE and/or --set features.image=FILE "
              "(from `m3bsr features text|image` or your own vectors; docs/features.md)")
    return f"m3bsr: {notice}" if other is None else f"{other}. Also, {notice}"
