#!/usr/bin/env python3
"""DeBERTa-v3-base-shaped classifier on the CPU: mira against transformers, same texts, one run.

usage:
    /root/venv-ref/bin/python benches/classifiers/deberta_cpu.py [--docs 64] [--threads 2] [--repeat 2]

What it does:
  1. makes (once) a random DebertaV2ForSequenceClassification with deberta-v3-base's shape (hidden 768,
     12 layers, 12 heads, FFN 3072, position_buckets 256, max_relative_positions 512, c2p + p2c,
     share_att_key, norm_rel_ebd layer_norm, 3 labels; f32) in .data/bench/deberta-v3-base-shape, with the
     fixture tokenizer of tests/fixtures/models/deberta-v3-cls (the vocabulary size does not change the
     compute); NeMo's quality classifier has this backbone;
  2. takes the first --docs documents of the sample corpus, truncated at 512 tokens;
  3. times `mira bench` (the engine alone, pre-tokenized) and `mira score` (the whole job), and
     transformers (eager attention, its only one for DeBERTa-v2; fp32, length-sorted padded batches of --batch-size,
     torch.inference_mode, tokenization inside the timed region);
  4. checks that mira's and transformers' logits agree on the first documents.
Prints one JSON line per engine and the ratios. Tokens are real (non-padding) tokens.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DebertaV2Config  # noqa: E402
from transformers import DebertaV2ForSequenceClassification  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(REPO, ".data", "bench", "deberta-v3-base-shape")
TOKENIZER = os.path.join(REPO, "tests", "fixtures", "models", "deberta-v3-cls")
CORPUS = os.path.join(REPO, ".data", "sample", "corpus.jsonl")
MIRA = os.environ.get("MIRA", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")),
                                           "release", "mira"))


def make_model():
    if os.path.exists(os.path.join(MODEL, "model.safetensors")):
        return
    os.makedirs(MODEL, exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), os.path.join(MODEL, f))
    vocab = json.load(open(os.path.join(TOKENIZER, "config.json")))["vocab_size"]
    cfg = DebertaV2Config(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
                          position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
                          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                          type_vocab_size=0, layer_norm_eps=1e-7, pad_token_id=0, num_labels=3,
                          id2label={0: "High", 1: "Medium", 2: "Low"})
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(cfg).eval().save_pretrained(MODEL, safe_serialization=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    make_model()
    texts = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == args.docs:
                break
    subset = os.path.join(REPO, ".data", "bench", f"deberta-docs-{args.docs}.jsonl")
    with open(subset, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    tok = AutoTokenizer.from_pretrained(MODEL)
    n_tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"])
    results = []

    def emit(rec):
        rec.update({"docs": len(texts), "tokens": n_tokens, "threads": args.threads,
                    "tokens_per_s": round(n_tokens / rec["wall_s"], 1),
                    "docs_per_s": round(len(texts) / rec["wall_s"], 2)})
        results.append(rec)
        print(json.dumps(rec), flush=True)

    # mira: the engine alone, then the whole job.
    out = subprocess.run([MIRA, "bench", "--model", MODEL, "--input", subset, "--device", "cpu", "--threads",
                          str(args.threads), "--max-tokens", "512", "--repeat", str(args.repeat), "--json"],
                         check=True, capture_output=True, text=True).stdout
    bench = json.loads(out)
    assert bench["tokens"] == n_tokens, (bench["tokens"], n_tokens)
    emit({"engine": "mira bench (engine)", "wall_s": round(n_tokens / bench["tokens_per_s"], 3)})
    runs = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        subprocess.run([MIRA, "score", "--model", MODEL, "--input", subset, "--output", "/tmp/deberta-scores.jsonl",
                        "--device", "cpu", "--threads", str(args.threads), "--max-tokens", "512"],
                       check=True, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - t)
    emit({"engine": "mira score (whole job)", "wall_s": round(min(runs), 3)})

    torch.set_num_threads(args.threads)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    # transformers has no SDPA path for DeBERTa-v2: eager is the only one.
    for attn in ("eager",):
        model = AutoModelForSequenceClassification.from_pretrained(MODEL, attn_implementation=attn).eval()
        logits = [None] * len(texts)

        def run():
            with torch.inference_mode():
                for s in range(0, len(order), args.batch_size):
                    idx = order[s:s + args.batch_size]
                    b = tok([texts[i] for i in idx], truncation=True, max_length=512, padding=True,
                            return_tensors="pt")
                    out = model(**b).logits
                    for k, i in enumerate(idx):
                        logits[i] = out[k].numpy()

        run()  # warm-up
        runs = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            run()
            runs.append(time.perf_counter() - t)
        emit({"engine": f"transformers {attn} fp32, padded batches of {args.batch_size}", "wall_s": round(min(runs), 3)})

    # Same logits (f32 both sides): mira's output file against transformers' last run.
    mira_rows = [json.loads(line) for line in open("/tmp/deberta-scores.jsonl")]
    got = np.array([[r["scores"][k] for k in ("High", "Medium", "Low")] for r in mira_rows])
    want = torch.softmax(torch.tensor(np.array(logits)), dim=-1).numpy()
    print(json.dumps({"max_abs_prob_diff_mira_vs_transformers": float(np.abs(got - want).max())}))
    for r in results[:2]:
        for peer in results[2:]:
            print(f"{r['engine']} / {peer['engine']}: {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
