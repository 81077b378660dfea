#!/usr/bin/env python3
"""Use a probe probex trained in PyTorch (or NumPy), and check it gives probex's own scores.

A ProbeX `train` or `select` artifact holds `checkpoint.safetensors`, exactly the state_dict of
the authors' `ProbeXClassification` (eliahuhorwitz/ProbeX, probex.py): a strict
`load_state_dict` takes it as it is. A probe trained with `standardize = true` read its weights
standardised, so it needs `standardize.safetensors` beside the checkpoint: `mean` [d_H, d_W]
and `scale` [1]. Apply them to every weight matrix W before the forward pass:

    x = (W - mean) / scale        # then logits = model(x), as for any ProbeX checkpoint

Usage (the layer's matrices come from `probex export`, in the probe's row order):

    probex export <layer dataset dir or cache key> layer/
    python3 docs/load_in_pytorch.py PROBE_DIR layer/layer.safetensors [--check] [--numpy]

PROBE_DIR is the artifact directory (`probex cache path <key>`, or a `select` node's entry);
`--check` compares the logits with the scores probex stored for the same models
(PROBE_DIR/outputs.safetensors) and exits 1 if they differ; `--numpy` runs the forward pass in
NumPy even where PyTorch is installed (what CI does: it installs NumPy, not PyTorch). With
PyTorch, the model is the authors' `ProbeXClassification` when their `probex.py` is importable
(put their repository on PYTHONPATH), else a module with the same parameter names and forward.
Needs NumPy (the files are read without the `safetensors` package). Discriminative ProbeX
probes (multi-label, class, numeric targets); a zero-shot probe standardises the same way.
"""

import argparse
import json
import struct
import sys

import numpy as np

DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16}


def load_safetensors(path):
    """(tensors by name as float32 arrays, header metadata) of a safetensors file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        raw = data[start:end]
        if t["dtype"] == "BF16":
            bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            a = bits.view(np.float32)
        elif t["dtype"] in DTYPES:
            a = np.frombuffer(raw, dtype=np.dtype(DTYPES[t["dtype"]]).newbyteorder("<"))
        else:
            sys.exit(f"{path}: tensor {name} has dtype {t['dtype']}, expected a float type")
        out[name] = a.astype(np.float32).reshape(t["shape"])
    return out, meta


def standardise(weights, probe_dir):
    """The inputs as the probe read them: (W - mean) / scale when it was trained on
    standardised inputs (standardize.safetensors beside the checkpoint), else W."""
    try:
        std, _ = load_safetensors(f"{probe_dir}/standardize.safetensors")
    except FileNotFoundError:
        return weights
    return (weights - std["mean"]) / std["scale"]


def forward_numpy(sd, x):
    """ProbeX's forward pass: R = X U, H = relu(V R^T), e = M flatten(H) + b, y = T e + c."""
    r = x @ sd["probes.weight"]                                   # [B, d_H, r_U]
    h = np.maximum(r.transpose(0, 2, 1) @ sd["shared_probe_proj.weight"].T, 0.0)  # [B, r_U, r_V]
    e = h.reshape(len(x), -1) @ sd["per_probe_encoders.weight"].T + sd["per_probe_encoders.bias"]
    return e @ sd["classification_head.weight"].T + sd["classification_head.bias"]


def probex_classification():
    """The authors' `ProbeXClassification`: from their probex.py when it is on PYTHONPATH, else
    a module with its parameter names, shapes and forward pass (bench/pytorch_epoch.py times
    it too)."""
    import torch
    from torch import nn

    try:
        from probex import ProbeXClassification  # the authors' probex.py, if on PYTHONPATH

        return ProbeXClassification
    except ImportError:
        pass

    class ProbeXClassification(nn.Module):
        """The authors' module's parameters (names, shapes) and forward pass."""

        def __init__(self, input_shape, num_classes, n_probes, proj_dim, rep_dim):
            super().__init__()
            self.probes = nn.Linear(n_probes, input_shape[1], bias=False)
            self.shared_probe_proj = nn.Linear(input_shape[0], proj_dim, bias=False)
            self.per_probe_encoders = nn.Linear(proj_dim * n_probes, rep_dim)
            self.classification_head = nn.Linear(rep_dim, num_classes)

        def forward(self, w):
            h = torch.relu(self.shared_probe_proj((w @ self.probes.weight).transpose(1, 2)))
            return self.classification_head(self.per_probe_encoders(h.flatten(1)))

    return ProbeXClassification


def forward_torch(sd, x):
    """The same through PyTorch: the authors' module (or one with its names), strict load."""
    import torch

    ProbeXClassification = probex_classification()
    d_w, r_u = sd["probes.weight"].shape
    r_v, d_h = sd["shared_probe_proj.weight"].shape
    r_t = sd["per_probe_encoders.weight"].shape[0]
    d_y = sd["classification_head.weight"].shape[0]
    model = ProbeXClassification(input_shape=(d_h, d_w), num_classes=d_y, n_probes=r_u,
                                 proj_dim=r_v, rep_dim=r_t)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("probe_dir", help="a train or select artifact directory")
    ap.add_argument("layer", help="layer.safetensors written by `probex export`")
    ap.add_argument("--check", action="store_true", help="compare with probex's stored scores")
    ap.add_argument("--numpy", action="store_true", help="NumPy even where PyTorch is installed")
    args = ap.parse_args()

    sd, meta = load_safetensors(f"{args.probe_dir}/checkpoint.safetensors")
    if "classification_head.weight" not in sd:
        sys.exit("this script runs discriminative ProbeX probes (ProbeXClassification); "
                 f"{args.probe_dir} holds another model ({sorted(sd)})")
    layer, _ = load_safetensors(args.layer)
    if "weights" not in layer:
        sys.exit(f"{args.layer}: no `weights` tensor; write it with `probex export`")
    x = standardise(layer["weights"], args.probe_dir)

    use_torch = not args.numpy
    if use_torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            use_torch = False
    logits = forward_torch(sd, x) if use_torch else forward_numpy(sd, x)
    task = json.loads(meta["probex"])["task"] if "probex" in meta else {"kind": "multi_label"}
    # probex stores regression outputs on the target's scale (its loss saw standardised targets).
    if task["kind"] == "regression":
        logits = task.get("target_mean", 0.0) + task.get("target_std", 1.0) * logits
    print(f"{len(x)} models, {logits.shape[1]} outputs, forward in "
          f"{'PyTorch' if use_torch else 'NumPy'}"
          f"{', standardised inputs' if x is not layer['weights'] else ''}")
    if not args.check:
        print(logits)
        return
    stored, _ = load_safetensors(f"{args.probe_dir}/outputs.safetensors")
    want = stored["scores"]
    if want.shape != logits.shape:
        sys.exit(f"shapes differ: probex stored {want.shape}, computed {logits.shape} "
                 "(export the probe's own layer dataset)")
    diff = float(np.abs(logits - want).max())
    tol = 1e-3 * (1.0 + float(np.abs(want).max()))
    print(f"max |logit - probex score| = {diff:.3g} (tolerance {tol:.3g})")
    if not diff <= tol:
        sys.exit(1)


if __name__ == "__main__":
    main()
