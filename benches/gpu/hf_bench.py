#!/usr/bin/env python3
"""The Hugging Face side of benches/gpu/run.sh: inputs for both engines, and the transformers baseline.

usage:
    python3 benches/gpu/hf_bench.py make-model OUT_DIR [--shape bert-base|minilm] [--tokenizer-from DIR] [--labels 15]
        [--dtype bf16|f32]
        A BERT-base-shaped random checkpoint (12 layers, hidden 768, 12 heads, intermediate 3072,
        exact GELU, 512 positions; --shape minilm: all-MiniLM-L6-v2's 6 layers, hidden 384, 12 heads,
        intermediate 1536, for when the real model is not bundled) as BertForSequenceClassification with LABELS regression outputs (a
        MIRA student: one output per anchor), weights N(0, 0.02^2) (LayerNorm weights 1 + N(0, 0.02^2),
        biases N(0, 0.02^2): nothing is zero), rounded to bf16 and saved as bf16 safetensors (--dtype f32:
        the same bf16-rounded values stored in f32, as published CPU classifiers are) with a tokenizer copied from
        --tokenizer-from (all-MiniLM-L6-v2's bert-base-uncased vocabulary when available, else the
        reduced test vocabulary of tests/fixtures/models/bert-cls-regression). Nothing is downloaded.
    python3 benches/gpu/hf_bench.py make-texts OUT.jsonl --tokenizer DIR [--docs 20000] [--seed 7]
        A realistic length mix: document lengths log-normal in words (median 300, sigma 1.0, so about a
        third exceed 512 tokens and are truncated), words drawn from the tokenizer's vocabulary.
    python3 benches/gpu/hf_bench.py run MODEL_DIR TEXTS.jsonl [--attn eager|sdpa] [--batch 128]
        The baseline: transformers in bf16 on cuda, padded batches in input order (the FineWeb-Edu
        classifier recipe: tokenizer(padding="longest", truncation=True, max_length=512)), timed
        forward passes after a warm-up, torch.cuda.synchronize() around the timed region. Tokenization is
        done before timing (mira bench also reports the engine alone). Prints one JSON line: real (not
        padded) tokens/s, docs/s, padded tokens, and the model FLOPs per real token for MFU.
"""

import argparse
import json
import math
import os
import random
import shutil
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_TOKENIZER = os.path.join(REPO_ROOT, "tests/fixtures/models/bert-cls-regression")


def tokenizer_files(src):
    return [f for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
            if os.path.exists(os.path.join(src, f))]


# hidden size, layers, intermediate size
SHAPES = {"bert-base": (768, 12, 3072), "minilm": (384, 6, 1536)}


def make_model(args):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    src = args.tokenizer_from or TEST_TOKENIZER
    vocab = len(json.load(open(os.path.join(src, "tokenizer.json")))["model"]["vocab"])
    hidden, layers, inter = SHAPES[args.shape]
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=12,
                     intermediate_size=inter, hidden_act="gelu", max_position_embeddings=512,
                     type_vocab_size=2, num_labels=args.labels, problem_type="regression",
                     id2label={i: f"anchor_{i}" for i in range(args.labels)},
                     label2id={f"anchor_{i}": i for i in range(args.labels)})
    torch.manual_seed(args.seed)
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.copy_(1 + 0.02 * torch.randn_like(p))
            else:
                p.copy_(0.02 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    if args.dtype == "f32":
        model = model.to(torch.float32)
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for f in tokenizer_files(src):
        shutil.copy(os.path.join(src, f), os.path.join(args.out, f))
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: BertForSequenceClassification ({args.shape} shape), {n / 1e6:.1f}M parameters, vocab {vocab}, "
          f"{args.labels} regression outputs, {args.dtype}", file=sys.stderr)


def make_texts(args):
    vocab = json.load(open(os.path.join(args.tokenizer, "tokenizer.json")))["model"]["vocab"]
    words = sorted(w for w in vocab if w.isalpha() and not w.startswith("##") and len(w) > 1)
    rng = random.Random(args.seed)
    with open(args.out, "w") as f:
        for i in range(args.docs):
            n = max(1, int(rng.lognormvariate(math.log(300), 1.0)))
            text = " ".join(rng.choice(words) for _ in range(min(n, 4000)))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    print(f"wrote {args.out}: {args.docs} documents from {len(words)} words", file=sys.stderr)


def flops_per_doc(cfg, n):
    """Forward FLOPs (multiply-add = 2) of an encoder on one document of n tokens: the dense layers
    and the attention products (Q·Kᵀ and P·V over the document itself, no padding)."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    dense = 2 * n * layers * (4 * h * h + 2 * h * i)
    attention = 2 * layers * 2 * n * n * h
    return dense + attention


def run(args):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = [json.loads(line)["text"] for line in open(args.texts)]
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, dtype=torch.bfloat16, attn_implementation=args.attn).to(args.device).eval()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    batches = []
    real_tokens = padded_tokens = 0
    flops = 0
    for s in range(0, len(texts), args.batch):
        enc = tok(texts[s:s + args.batch], padding="longest", truncation=True, max_length=args.max_tokens,
                  return_tensors="pt")
        lens = enc["attention_mask"].sum(1).tolist()
        real_tokens += sum(lens)
        padded_tokens += enc["input_ids"].numel()
        flops += sum(flops_per_doc(model.config, n) for n in lens)
        batches.append({k: v.to(args.device) for k, v in enc.items()})
    with torch.inference_mode():
        for b in batches[:3]:
            model(**b)
        sync()
        best = math.inf
        for _ in range(args.repeat):
            t = time.perf_counter()
            for b in batches:
                model(**b).logits.float()
            sync()
            best = min(best, time.perf_counter() - t)
    print(json.dumps({
        "engine": f"transformers {__import__('transformers').__version__} bf16 {args.attn}, padded batches of "
                  f"{args.batch}",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else args.device, "docs": len(texts), "tokens": real_tokens,
        "padded_tokens": padded_tokens, "wall_s": round(best, 4),
        "tokens_per_s": round(real_tokens / best, 1), "docs_per_s": round(len(texts) / best, 1),
        "model_flops_per_token": round(flops / real_tokens), "tflops_per_s": round(flops / best / 1e12, 1),
    }))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("out")
    m.add_argument("--shape", default="bert-base", choices=sorted(SHAPES))
    m.add_argument("--tokenizer-from")
    m.add_argument("--labels", type=int, default=15)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    t = sub.add_parser("make-texts")
    t.add_argument("out")
    t.add_argument("--tokenizer", required=True)
    t.add_argument("--docs", type=int, default=20000)
    t.add_argument("--seed", type=int, default=7)
    r = sub.add_parser("run")
    r.add_argument("model")
    r.add_argument("texts")
    r.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--max-tokens", type=int, default=512)
    r.add_argument("--repeat", type=int, default=3)
    r.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test of this script")
    args = p.parse_args()
    {"make-model": make_model, "make-texts": make_texts, "run": run}[args.cmd](args)


if __name__ == "__main__":
    main()
