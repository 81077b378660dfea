#!/usr/bin/env python3
"""docs/load_in_pytorch.py on a finished run, as a user would use it: export the selected
probe's layer with `probex export`, then load the probe's checkpoint (and, when the setting
selection picked reads standardised weights, its standardize.safetensors) outside probex and
check the logits against the scores probex stored. Run on the main job, whose selection picks
ProbeX's layer and setting (learning rate, standardised or not) on validation, so either kind of
probe may come out; the check must hold for both.
Usage: pytorch_check.py PROBEX_BINARY RUN_DIR SELECT_STAGE CACHE_DIR
"""
import json
import os
import subprocess
import sys
import tempfile


def main():
    probex, run, stage, cache = sys.argv[1:5]
    with open(os.path.join(run, "status.json")) as f:
        nodes = json.load(f)["nodes"]
    with open(os.path.join(run, "results.json")) as f:
        results = json.load(f)["results"][stage]
    layer = results["layer"]
    setting = results.get("setting", "")
    select = next(n for n in nodes if n["node"] == stage)
    extract = [n for n in nodes if n["kind"] == "extract" and n["node"].endswith(f"[layer={layer}]")]
    if len(extract) != 1:
        sys.exit(f"expected one extract node of layer {layer}, found {[n['node'] for n in extract]}")
    key = select["key"]
    probe = os.path.join(cache, "entries", key[:2], key, "data")
    standardised = os.path.isfile(os.path.join(probe, "standardize.safetensors"))
    # The file and the setting must agree: a standardised probe without its standardisation
    # beside it (or the reverse) would give wrong logits to anyone using the checkpoint.
    if ("standardize=true" in setting) != standardised and "standardize=" in setting:
        sys.exit(f"{probe}: setting {setting!r} but standardize.safetensors is "
                 f"{'present' if standardised else 'missing'}")
    print(f"{stage}: layer {layer}, setting {setting or '(none)'}, "
          f"{'standardised' if standardised else 'raw'} inputs")
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([probex, "export", extract[0]["key"], out, "--cache", cache], check=True)
        script = os.path.join(os.path.dirname(__file__), "..", "docs", "load_in_pytorch.py")
        done = subprocess.run([sys.executable, script, probe, os.path.join(out, "layer.safetensors"),
                               "--check", "--numpy"])
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
