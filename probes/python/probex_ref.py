"""An independent PyTorch reference of ProbeX, written from probex's method page (not the
authors' code): the parameter names and layouts of the official state_dict, and the forward
pass R = X @ U, H = relu(V(R^T)), e = M(flatten(H)), y = T(e).

Used by the parity test (parity.py) and the step benchmark (step_bench.py).
"""

import torch
import torch.nn.functional as F
from torch import nn


class ProbeX(nn.Module):
    """ProbeX with a classification head (discriminative) or a text-side regression head
    (zero-shot: cosine logits against projected text embeddings)."""

    def __init__(self, d_h, d_w, r_u, r_v, r_t, d_y=None, d_text=None):
        super().__init__()
        # probes.weight is [d_W, r_U]: a Linear(r_U -> d_W), so its fan-in is r_U.
        self.probes = nn.Linear(r_u, d_w, bias=False)
        self.shared_probe_proj = nn.Linear(d_h, r_v, bias=False)
        self.per_probe_encoders = nn.Linear(r_u * r_v, r_t)
        if d_text is None:
            self.classification_head = nn.Linear(r_t, d_y)
        else:
            self.regression_head = nn.Linear(d_text, r_t)

    def encode(self, x):
        r = x @ self.probes.weight                      # [B, d_H, r_U]
        h = F.relu(self.shared_probe_proj(r.transpose(1, 2)))  # [B, r_U, r_V]
        return self.per_probe_encoders(h.flatten(1))   # [B, r_T], index = probe * r_V + v

    def forward(self, x, text=None):
        e = self.encode(x)
        if text is None:
            return self.classification_head(e)
        t = self.regression_head(text)
        return F.normalize(e, dim=1) @ F.normalize(t, dim=1).T

    @staticmethod
    def from_state_dict(sd):
        """Builds the model whose shapes match a state dict (official names)."""
        d_w, r_u = sd["probes.weight"].shape
        r_v, d_h = sd["shared_probe_proj.weight"].shape
        r_t = sd["per_probe_encoders.weight"].shape[0]
        if "classification_head.weight" in sd:
            m = ProbeX(d_h, d_w, r_u, r_v, r_t, d_y=sd["classification_head.weight"].shape[0])
        else:
            m = ProbeX(d_h, d_w, r_u, r_v, r_t, d_text=sd["regression_head.weight"].shape[1])
        m.load_state_dict(sd)  # strict: every name and shape must match
        return m
