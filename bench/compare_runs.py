#!/usr/bin/env python3
"""Compares two probex train reports (CPU vs CUDA) and prints agreement and timing.

usage: compare_runs.py CPU_RUN_DIR CUDA_RUN_DIR [TIME_RUN_DIR N_TRAIN D_H D_W R_U PEAK_TFLOPS
                      [PYTORCH_JSON]]
"""
import glob
import json
import os
import sys


def report(run):
    paths = glob.glob(f"{run}/probe*/report.json")
    if len(paths) != 1:
        sys.exit(f"expected one probe report under {run}, found {paths}")
    with open(paths[0]) as f:
        return json.load(f)


cpu, cuda = report(sys.argv[1]), report(sys.argv[2])
lc, lg = cpu["curves"]["train_loss"], cuda["curves"]["train_loss"]
print("epoch  cpu_loss      cuda_loss     rel_diff")
worst = 0.0
for e, (a, b) in enumerate(zip(lc, lg)):
    rel = abs(a - b) / max(abs(a), 1e-12)
    worst = max(worst, rel)
    print(f"{e:5d}  {a:.8f}  {b:.8f}  {rel:.2e}")
for split in ("val", "test"):
    a = cpu["metrics"].get(split, {}).get("accuracy")
    b = cuda["metrics"].get(split, {}).get("accuracy")
    print(f"{split} accuracy: cpu {a}  cuda {b}")
ok = worst < 1e-3 and len(lc) == len(lg)
print(f"max relative loss difference {worst:.2e}: {'AGREE' if ok else 'DISAGREE'} (tolerance 1e-3)")
print(f"cpu {cpu['seconds']:.1f}s ({cpu['device']}), cuda {cuda['seconds']:.1f}s ({cuda['device']}) for {len(lc)} epochs")

if len(sys.argv) > 3:
    t = report(sys.argv[3])
    n, dh, dw, ru, peak = (float(x) for x in sys.argv[4:9])
    epochs = len(t["curves"]["train_loss"])
    per_epoch = t["seconds"] / epochs
    flop = 4 * n * dh * dw * ru  # X@U forward and X^T @ dR backward, per epoch
    print(f"\ncuda timing: {epochs} epochs in {t['seconds']:.1f}s = {per_epoch:.3f} s/epoch "
          f"(incl. validation every {t['config']['validate_every']})")
    print(f"500 epochs projected: {500 * per_epoch / 60:.1f} min")
    print(f"X@U products: {flop / 1e9:.0f} GFLOP/epoch -> at least {flop / per_epoch / 1e12:.1f} TFLOP/s "
          f"= {100 * flop / per_epoch / 1e12 / peak:.0f}% of {peak:.0f} TFLOP/s fp32")
    # The paper's SupViT sweep: 74 layers x 500 epochs (ProbeX alone), one layer at a time;
    # the gang timings above say how much sweep mode takes off it. Target: <= 20 min.
    print(f"74-layer x 500-epoch sweep, one layer at a time: {74 * 500 * per_epoch / 60:.1f} min "
          f"(target <= 20 min)")
    if len(sys.argv) > 9 and os.path.isfile(sys.argv[9]):
        with open(sys.argv[9]) as f:
            for r in json.load(f):
                print(f"pytorch (data on {r['data']}, tf32 {'on' if r['tf32'] else 'off'}): "
                      f"{r['epoch_s']:.3f} s/epoch -> probex is {r['epoch_s'] / per_epoch:.2f}x "
                      f"as fast")
sys.exit(0 if ok else 1)
