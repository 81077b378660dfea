"""One ProbeX training step in PyTorch on the CPU (forward, BCE-with-logits, backward, Adam),
timed like probex's `probex_step` example. Prints `torch_step_s=<seconds>`.

usage: python step_bench.py --threads 2 --batch 128 --d 768 --rank 128 --classes 100 --steps 5
"""

import argparse
import time

import torch
import torch.nn.functional as F

from probex_ref import ProbeX


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = ProbeX(a.d, a.d, a.rank, a.rank, a.rank, d_y=a.classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
    x = torch.randn(a.batch, a.d, a.d)
    y = (torch.rand(a.batch, a.classes) > 0.5).float()

    def step():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(a.warmup):
        step()
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    print(f"torch_version={torch.__version__}")
    print(f"torch_step_s={times[len(times) // 2]:.4f}")


if __name__ == "__main__":
    main()
