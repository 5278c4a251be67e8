"""MM-SASRec: SASRec whose item vectors fuse the id embedding with frozen image and text features.

Follows SASRec (Kang & McAuley, ICDM 2018) for the sequence model and its defaults. There is no
single canonical "multi-modal SASRec" paper; this is the early-fusion variant used as a baseline in
the multi-modal sequential recommendation literature: each frozen modality feature is normalised
(LayerNorm without affine), projected to d and added to the id embedding,
``e_i = E_id[i] + sum_m (mask_m[i] ? W_m LN(x_m[i]) : v_m)`` with a learned vector ``v_m`` for an
item whose modality is missing. The fused vectors are both the sequence input and the (tied) output
layer, so items with few interactions still get content-based scores. Without features in the
catalogue (or with ``modalities: []``) it is exactly SASRec.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m3bsr.batch import Catalogue
from m3bsr.errors import input_error
from m3bsr.models.configs import MMSASRecConfig
from m3bsr.models.sasrec import SASRec


class MMSASRec(SASRec):
    """Shapes: item ids [...] → fused vectors [..., d]; the rest is :class:`SASRec`."""

    config_class = MMSASRecConfig

    def __init__(self, cfg: MMSASRecConfig, catalogue: Catalogue):
        super().__init__(cfg, catalogue)
        d = cfg.hidden_size
        wanted = list(catalogue.features) if cfg.modalities is None else cfg.modalities
        unknown = [m for m in wanted if m not in catalogue.features]
        if unknown:
            raise input_error("config key model.modalities",
                              f"{unknown} not in the dataset (it has {list(catalogue.features)})",
                              "Fix model.modalities or prepare the dataset with these features")
        self.modalities = wanted
        for m in wanted:
            # Frozen features are not parameters and not saved in checkpoints (the catalogue supplies them).
            self.register_buffer(f"feat_{m}", catalogue.features[m].float(), persistent=False)
            self.register_buffer(f"mask_{m}", catalogue.feature_masks[m].bool(), persistent=False)
        self.proj = nn.ModuleDict({m: nn.Linear(catalogue.features[m].shape[1], d) for m in wanted})
        self.missing = nn.ParameterDict({m: nn.Parameter(torch.randn(d) * 0.02) for m in wanted})
        for lin in self.proj.values():  # start at the id embedding's scale (std 0.02)
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def item_vectors(self, items: Tensor) -> Tensor:
        out = self.item_emb(items)  # [..., d]
        for m in self.modalities:
            x = getattr(self, f"feat_{m}")[items]  # [..., D_m]
            x = self.proj[m](F.layer_norm(x, x.shape[-1:]))  # [..., d]
            has = getattr(self, f"mask_{m}")[items].unsqueeze(-1)  # [..., 1]
            out = out + torch.where(has, x, self.missing[m].to(x.dtype).expand_as(x))
        return out

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        return self.item_vectors(torch.arange(self.n_items + 1, device=self.item_emb.weight.device)), None

    def score(self, reps: Tensor, items: Tensor | slice | None = None) -> Tensor:
        """Fuses only the scored items (a catalogue chunk or candidates), not the whole catalogue."""
        if items is None:
            return F.linear(reps, self.output_layer()[0])  # [B, P, I+1]
        if isinstance(items, slice):
            items = torch.arange(self.n_items + 1, device=reps.device)[items]
        if items.dim() == 1:
            return F.linear(reps, self.item_vectors(items))  # [B, P, C]
        return torch.einsum("bpd,bpcd->bpc", reps, self.item_vectors(items))  # [B, P, C]
