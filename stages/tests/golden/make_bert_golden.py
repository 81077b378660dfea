"""Makes the tiny BERT golden fixture that probex's `minilm` encoder (BERT, mean pooling,
L2 normalisation) must reproduce offline, without the all-MiniLM-L6-v2 package.

A randomly initialised BertModel (2 layers x 32 wide) with a WordPiece tokenizer over a small
vocabulary written here. Writes, under bert-tiny/ beside this script:
  config.json, model.safetensors, tokenizer.json, sentence_bert_config.json   the model folder
  expected.json   texts, token ids and sentence embeddings (sentence-transformers' recipe:
                  padded batch, mean over real tokens, L2-normalised)
Run with a Python that has torch and transformers:
  python stages/tests/golden/make_bert_golden.py
"""

import json
import os
import string

import torch
from transformers import BertConfig, BertModel, BertTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "bert-tiny")
MAX_SEQ = 24  # sentence_bert_config.json's max_seq_length: exercises truncation
TEXTS = ["This is an example sentence", "Each sentence is converted",
         "a photo of a maple tree", "a photo of a sweet pepper", "A PHOTO of a Whale!",
         "unbelievable photographs, 42 of them", "naïve café crème",
         "a photo of a " + "very " * 40 + "long tree"]
WORDS = ["this", "is", "an", "example", "sentence", "each", "converted", "a", "photo", "of",
         "maple", "tree", "sweet", "pepper", "whale", "very", "long", "the", "cafe", "photograph",
         "un", "##believ", "##able", "##s", "##ing", "##ed"]


def main():
    torch.manual_seed(20251127)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    vocab += list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = list(dict.fromkeys(vocab))
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)

    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, hidden_act="gelu",
                        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-12)
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            elif p.dim() == 2 and "embeddings" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn_like(p))

    enc = tok(TEXTS, padding=True, truncation="longest_first", max_length=MAX_SEQ,
              return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(mean, p=2, dim=1)
    ids = [[int(i) for i, m in zip(row, mk) if m] for row, mk in
           zip(enc["input_ids"], enc["attention_mask"])]

    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(OUT, safe_serialization=True)
    tok.backend_tokenizer.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": MAX_SEQ, "do_lower_case": False}, f)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"texts": TEXTS, "ids": ids, "embeddings": emb.tolist()}, f, indent=1,
                  ensure_ascii=False)
        f.write("\n")
    for name in sorted(os.listdir(OUT)):
        print(name, os.path.getsize(os.path.join(OUT, name)))


if __name__ == "__main__":
    main()
