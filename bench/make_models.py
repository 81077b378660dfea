#!/usr/bin/env python3
"""Writes a folder of generated "fine-tuned" models for GPU checks and benchmarks.

Each model has one layer `encoder.layer.0.attention.output.dense.weight` of shape [d_h, d_w]
(ViT-B's best layer is 768 x 768) holding base + A @ diag(y) @ B + noise, where y is the model's
multi-hot over the 100 CIFAR-100 classes (50 per model, as Model-J), plus the Model-J metadata
(`dataset_chosen_targets` as a Python list literal, `split`). Deterministic for a seed.

usage: make_models.py OUT_DIR [--models 1000] [--shape 768x768] [--seed 0] [--noise-layers 0]
"""
import argparse
import json
import os
import struct

import numpy as np

try:
    from safetensors.numpy import save_file
except ImportError:  # the GPU machine may lack the package: the format is simple enough

    def save_file(tensors, path, metadata=None):
        """safetensors' format: an 8-byte header length, the JSON header, the raw data."""
        header, offset, blobs = {}, 0, []
        if metadata:
            header["__metadata__"] = metadata
        for name, array in sorted(tensors.items()):
            blob = np.ascontiguousarray(array, dtype=np.float32).tobytes()
            header[name] = {"dtype": "F32", "shape": list(array.shape),
                            "data_offsets": [offset, offset + len(blob)]}
            offset += len(blob)
            blobs.append(blob)
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(head)))
            f.write(head)
            for blob in blobs:
                f.write(blob)

CIFAR100 = sorted("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab
crocodile cup dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard
lamp lawn_mower leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom
oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine
possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor
train trout tulip turtle wardrobe whale willow_tree wolf woman worm""".split())
assert len(CIFAR100) == 100


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--models", type=int, default=1000)
    ap.add_argument("--shape", default="768x768")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-layers", type=int, default=0,
                    help="extra layers of the same shape that carry no label signal")
    args = ap.parse_args()
    d_h, d_w = (int(x) for x in args.shape.split("x"))
    rng = np.random.default_rng(args.seed)
    base = rng.standard_normal((d_h, d_w), dtype=np.float32) * 0.02
    a = rng.standard_normal((d_h, 100), dtype=np.float32) * 0.01
    b = rng.standard_normal((100, d_w), dtype=np.float32)
    os.makedirs(args.out, exist_ok=True)
    for i in range(args.models):
        chosen = np.sort(rng.choice(100, size=50, replace=False))
        y = np.zeros(100, dtype=np.float32)
        y[chosen] = 1.0
        w = base + (a * y) @ b + rng.standard_normal((d_h, d_w), dtype=np.float32) * 0.005
        split = "val" if i % 10 == 0 else "test" if i % 10 == 1 else "train"
        meta = {
            "dataset_chosen_targets": repr([CIFAR100[c] for c in chosen]),
            "split": split,
        }
        tensors = {"encoder.layer.0.attention.output.dense.weight": w.astype(np.float32)}
        for j in range(args.noise_layers):
            noise = base + rng.standard_normal((d_h, d_w), dtype=np.float32) * 0.02
            tensors[f"encoder.layer.{j + 1}.attention.output.dense.weight"] = noise
        save_file(
            tensors,
            os.path.join(args.out, f"model_idx_{i:04d}.safetensors"),
            metadata=meta,
        )


if __name__ == "__main__":
    main()
