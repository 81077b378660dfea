#!/usr/bin/env python3
"""The authors' ProbeX, timed beside probex on the same GPU and the same generated models.

The model is `ProbeXClassification` with the authors' parameter names and forward pass (as in
docs/load_in_pytorch.py); the loop is theirs: Adam (lr 1e-3, weight_decay 1e-5), batch 128,
BCE-with-logits on the multi-hot targets, a shuffled DataLoader over the train split. The
models are the ones bench/make_models.py wrote for probex's run, read without the safetensors
package (the GPU machine may not have it).

Two ways to feed the loop, to give PyTorch its best case and its usual one:
- `gpu`: every train matrix already on the GPU, batches indexed there (no copies in the loop);
- `host`: the authors' DataLoader over host tensors, each batch copied to the GPU (pinned).
Each is timed with TF32 off (fp32 products, as probex computes) and on.

usage: pytorch_epoch.py MODELS_DIR [--epochs 5] [--batch 128] [--rank 128] [--data gpu,host]
                        [--json OUT]
Prints one line per setting: mean seconds per epoch over --epochs epochs after one warm-up.
"""
import argparse
import ast
import glob
import json
import os
import sys
import time

import numpy as np

# The safetensors reader and the authors' module, shared with the user-facing script.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs"))
from load_in_pytorch import load_safetensors, probex_classification  # noqa: E402


def load_train(models_dir):
    """The train split's matrices [N, d_H, d_W] and multi-hot targets [N, 100] (classes sorted
    by name, as probex's cifar100 vocabulary)."""
    xs, labels = [], []
    for path in sorted(glob.glob(os.path.join(models_dir, "*.safetensors"))):
        tensors, meta = load_safetensors(path)
        if meta.get("split") != "train":
            continue
        # Layer 0 of probex's gpu-check.toml: the first weight matrix by name.
        xs.append(tensors[sorted(tensors)[0]].astype(np.float32))
        labels.append(ast.literal_eval(meta["dataset_chosen_targets"]))
    if not xs:
        sys.exit(f"no train models under {models_dir}")
    classes = sorted({c for l in labels for c in l} | set(CIFAR100))
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(xs), len(classes)), dtype=np.float32)
    for i, l in enumerate(labels):
        y[i, [index[c] for c in l]] = 1.0
    return np.stack(xs), y


# make_models.py's class list: the targets are laid out over all 100 classes.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_models import CIFAR100  # noqa: E402


def time_setting(torch, x, y, data, tf32, args):
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    dev = torch.device("cuda")
    n, d_h, d_w = x.shape
    model = probex_classification()((d_h, d_w), y.shape[1], args.rank, args.rank, args.rank).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    if data == "gpu":
        xg, yg = torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)

        def batches():
            order = torch.randperm(n, device=dev)
            for s in range(0, n, args.batch):
                idx = order[s:s + args.batch]
                yield xg[idx], yg[idx]
    else:
        ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=True,
                                             pin_memory=True)

        def batches():
            for xb, yb in loader:
                yield xb.to(dev, non_blocking=True), yb.to(dev, non_blocking=True)

    def epoch():
        model.train()
        for xb, yb in batches():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()

    epoch()  # warm-up: kernels chosen, memory pool filled
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.epochs):
        epoch()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.epochs
    peak = torch.cuda.max_memory_allocated() / 2**20
    return seconds, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--data", default="gpu,host")
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("PyTorch sees no CUDA device")
    x, y = load_train(args.models)
    print(f"pytorch {torch.__version__} on {torch.cuda.get_device_name(0)}: "
          f"{x.shape[0]} train models of {x.shape[1]}x{x.shape[2]}, batch {args.batch}, "
          f"rank {args.rank}, {args.epochs} timed epochs")
    results = []
    for data in args.data.split(","):
        for tf32 in (False, True):
            seconds, peak = time_setting(torch, x, y, data, tf32, args)
            results.append({"data": data, "tf32": tf32, "epoch_s": seconds, "peak_mib": peak})
            print(f"pytorch epoch, data on {data}, tf32 {'on ' if tf32 else 'off'}: "
                  f"{1000 * seconds:.1f} ms (peak allocated {peak:.0f} MiB)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
