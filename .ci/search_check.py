#!/usr/bin/env python3
"""Zero-shot text search on a finished mini-zeroshot run: for every class held out of the
probe's training, `probex search "a photo of a <class>" --split test_holdout` must rank a model
of that class first for at least MIN_SHARE of the classes (chance: one class in as many as there
are). Usage: search_check.py PROBEX_BINARY RUN_DIR STAGE
"""
import json
import subprocess
import sys

MIN_SHARE = 0.4  # 10x chance with 25 held-out classes


def search(probex, run, stage, query, top):
    out = subprocess.run(
        [probex, "search", query, "--index", run, "--stage", stage,
         "--split", "test_holdout", "--top", str(top), "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out)


def main():
    probex, run, stage = sys.argv[1:4]
    every = search(probex, run, stage, "a photo", 1_000_000)
    classes = sorted({h["label"] for h in every})
    right = 0
    for c in classes:
        top = search(probex, run, stage, "a photo of a " + c.replace("_", " "), 1)[0]
        ok = top["label"] == c
        right += ok
        print(f"{'ok  ' if ok else 'miss'} {c:<14} top: {top['label']} ({top['id']})")
    share = right / len(classes)
    print(f"{right} of {len(classes)} held-out classes found first "
          f"(chance {1 / len(classes):.3f}, need {MIN_SHARE})")
    sys.exit(0 if share >= MIN_SHARE else 1)


main()
