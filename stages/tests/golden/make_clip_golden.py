"""Makes the tiny CLIP golden fixture that probex's CLIP text tower must reproduce.

A randomly initialised CLIPModel (text tower 2 layers x 32 wide, projection 16; a token vision
tower only so that the checkpoint has the layout of openai/clip-vit-large-patch14) with a
byte-level BPE tokenizer whose merges are learned here from a few class names. Writes, under
clip-tiny/ beside this script:
  config.json, model.safetensors, tokenizer.json   the model folder probex loads
  expected.json                                    prompts, token ids and text features
Run with a Python that has torch and transformers (any recent version):
  python stages/tests/golden/make_clip_golden.py
Nothing is downloaded: the vocabulary, merges and weights are all made here.
"""

import collections
import json
import os
import re

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "clip-tiny")
TEMPLATE = "a photo of a {}"
CLASSES = ["apple", "maple_tree", "sweet_pepper", "aquarium_fish", "lawn_mower", "whale",
           "pickup_truck", "willow_tree", "crème_brûlée"]
EXTRA = ["A PHOTO of a Whale, swimming!", "a photo of the number 42 and a cat's toy",
         "a photo of a " + "very " * 90 + "long tree"]
CORPUS = " ".join([TEMPLATE.format(c.replace("_", " ")) for c in CLASSES] * 3 +
                  ["the tree", "a tree", "trees", "photos of fish", "photograph"])
MERGES = 80


def bytes_to_unicode():
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn_merges(text, count):
    """Plain BPE on the corpus words, end-of-word marked with </w> as CLIP does."""
    table = bytes_to_unicode()
    words = collections.Counter(re.findall(r"[^\W\d_]+|\d|[^\s\w]+", text.lower()))
    seqs = {}
    for w, n in words.items():
        chars = [table[b] for b in w.encode("utf-8")]
        seqs[tuple(chars[:-1] + [chars[-1] + "</w>"])] = n
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for s, n in seqs.items():
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += n
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        new = {}
        for s, n in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            new[tuple(out)] = n
        seqs = new
    return merges


def main():
    torch.manual_seed(20251127)
    base = list(bytes_to_unicode().values())
    merges = learn_merges(CORPUS, MERGES)
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    tok = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges],
                        model_max_length=77)

    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=77, hidden_act="quick_gelu",
                         layer_norm_eps=1e-5, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2),  # 2: the legacy value OpenAI's configs carry
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=8, patch_size=4),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    # Default init leaves layer norms at 1/0 and weights tiny; spread everything so that a
    # wrong scale, bias or ordering shows up in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2 and "embedding" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn_like(p))

    texts = [TEMPLATE.format(c.replace("_", " ")) for c in CLASSES] + EXTRA
    enc = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model.text_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        feats = model.text_projection(out.pooler_output)
    ids = [[int(i) for i, m in zip(row, mask) if m] for row, mask in
           zip(enc["input_ids"], enc["attention_mask"])]

    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.backend_tokenizer.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"template": TEMPLATE, "classes": CLASSES, "texts": texts, "ids": ids,
                   "embeddings": feats.tolist()}, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()
