"""Forward-pass parity between probex and an independent PyTorch ProbeX (probex_ref.py).

Writes, into probes/tests/data/parity/ (the golden files the Rust test `parity` reads):
  torch_on_rust.safetensors   PyTorch's outputs for the probex-written checkpoints
                              rust_probex.safetensors and rust_zeroshot.safetensors, loaded with
                              a strict load_state_dict (names and layouts must match exactly)
  torch_probex.safetensors    state dicts initialised and written by PyTorch
  torch_zeroshot.safetensors
  torch_outputs.safetensors   PyTorch's outputs for those state dicts
Outputs are computed in float64 from the float32 parameters and inputs, then stored as float32.

Regenerate (only needed when the parity fixtures change):
  cargo test -p probex-probes --test parity -- --ignored regenerate
  python probes/python/parity.py
"""

import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from probex_ref import ProbeX  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "parity")


def outputs(probex, zeroshot, x, text):
    with torch.no_grad():
        p, z = probex.double(), zeroshot.double()
        x, text = x.double(), text.double()
        return {
            "probex_logits": p(x).float().contiguous(),
            "probex_e": p.encode(x).float().contiguous(),
            "zeroshot_logits": z(x, text).float().contiguous(),
            "zeroshot_e": z.encode(x).float().contiguous(),
        }


def main():
    inputs = load_file(os.path.join(DATA, "inputs.safetensors"))
    x, text = inputs["x"], inputs["text"]

    # probex -> PyTorch: strict load of the checkpoints probex wrote.
    rust_p = ProbeX.from_state_dict(load_file(os.path.join(DATA, "rust_probex.safetensors")))
    rust_z = ProbeX.from_state_dict(load_file(os.path.join(DATA, "rust_zeroshot.safetensors")))
    save_file(outputs(rust_p, rust_z, x, text), os.path.join(DATA, "torch_on_rust.safetensors"))

    # PyTorch -> probex: PyTorch's own initialisation, written with safetensors.torch.
    d_h, d_w = x.shape[1], x.shape[2]
    torch.manual_seed(0)
    tp = ProbeX(d_h, d_w, 4, 5, 6, d_y=3)
    tz = ProbeX(d_h, d_w, 4, 5, 6, d_text=text.shape[1])
    save_file(tp.state_dict(), os.path.join(DATA, "torch_probex.safetensors"))
    save_file(tz.state_dict(), os.path.join(DATA, "torch_zeroshot.safetensors"))
    save_file(outputs(tp, tz, x, text), os.path.join(DATA, "torch_outputs.safetensors"))
    print("wrote golden files to", os.path.normpath(DATA))


if __name__ == "__main__":
    main()
