#!/usr/bin/env python3
"""Create a ModernBERT-base-shaped random checkpoint for CPU throughput benchmarks.

usage:
    /root/venv-ref/bin/python scripts/make_modernbert_base.py [OUT_DIR]   (default .data/models/modernbert-base-random)

ModernBertForSequenceClassification with answerdotai/ModernBERT-base's shape and settings (hidden 768,
22 layers, 12 heads, intermediate 1152 (GeGLU: Wi is 768 -> 2304), max_position_embeddings 8192,
local_attention 128, a global layer every 3rd layer, rope theta 160000 global / 10000 local, no biases,
gelu, norm_eps 1e-5, classifier_pooling "mean"), one regression label, random N(0, 0.02^2) weights
(LayerNorm weights 1 + N(0, 0.02^2)), saved in float32 with the reduced WordPiece tokenizer of
tests/fixtures/models/bert-cls-regression copied in (so vocab_size is 6000, not 50368: the embedding
table is smaller than the real one, the encoder is the same). The output is not committed; it is
for benchmarks only, its numbers mean nothing. Nothing is downloaded.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    ModernBertConfig,
    ModernBertForSequenceClassification,
)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_SRC = os.path.join(REPO_ROOT, "tests", "fixtures", "models", "bert-cls-regression")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
SEED = 20240601
STD = 0.02


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default=os.path.join(REPO_ROOT, ".data", "models", "modernbert-base-random"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    tok = tokenizers.Tokenizer.from_file(os.path.join(TOKENIZER_SRC, "tokenizer.json"))
    pad, cls_id, sep = (tok.token_to_id(t) for t in ("[PAD]", "[CLS]", "[SEP]"))
    config = ModernBertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=768,
        intermediate_size=1152,
        num_hidden_layers=22,
        num_attention_heads=12,
        hidden_activation="gelu",
        max_position_embeddings=8192,
        initializer_range=0.02,
        initializer_cutoff_factor=2.0,
        norm_eps=1e-5,
        norm_bias=False,
        pad_token_id=pad,
        bos_token_id=cls_id,
        eos_token_id=sep,
        cls_token_id=cls_id,
        sep_token_id=sep,
        attention_bias=False,
        attention_dropout=0.0,
        layer_types=["full_attention" if i % 3 == 0 else "sliding_attention" for i in range(22)],
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        local_attention=128,
        embedding_dropout=0.0,
        mlp_bias=False,
        mlp_dropout=0.0,
        decoder_bias=True,
        classifier_pooling="mean",
        classifier_dropout=0.0,
        classifier_bias=False,
        classifier_activation="gelu",
        num_labels=1,
        problem_type="regression",
        id2label={0: "score"},
        label2id={"score": 0},
    )

    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = ModernBertForSequenceClassification(config).eval()
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            parts = name.split(".")
            v = STD * torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() == 1 and "norm" in parts[-2] and parts[-1] == "weight":
                v += 1.0
            p.copy_(v)
    n_params = sum(p.numel() for p in model.parameters())

    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copy(os.path.join(TOKENIZER_SRC, f), os.path.join(args.out, f))
    t_save = time.time() - t0

    # smoke test: it loads back as saved and gives finite, input-dependent scores
    m = AutoModelForSequenceClassification.from_pretrained(args.out).eval()
    assert type(m) is ModernBertForSequenceClassification
    texts = ["hello", "The quick brown fox jumps over the lazy dog. " * 30]
    outs = []
    for t in texts:
        ids = torch.tensor([tok.encode(t).ids[:512]])
        with torch.no_grad():
            outs.append(m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].item())
    assert all(map(lambda x: x == x and abs(x) < 1e6, outs)) and outs[0] != outs[1], outs
    files = {f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))}
    with open(os.path.join(args.out, "config.json")) as f:
        layer_types = json.load(f)["layer_types"]
    print(f"wrote {args.out}: {n_params} parameters, {sum(files.values()) / 1e6:.1f} MB {files}")
    print(f"  global layers {[i for i, t in enumerate(layer_types) if t == 'full_attention']}; "
          f"smoke logits {outs}; build+save {t_save:.1f}s, total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
