#!/usr/bin/env python3
"""Reference side of mira's CPU throughput comparison.

usage:
    /root/venv-ref/bin/python benches/reference/bench_torch.py \
        --model .data/models/all-MiniLM-L6-v2 --input .data/sample/corpus.jsonl \
        [--max-tokens 256] [--threads 2] [--batch-size 32] [--repeat 3] [--onnx] [--onnx-int8]
        [--json]

Engines:
  sentence-transformers  SentenceTransformer.encode in fp32 on CPU (its own length sorting and
                         padded batches; includes tokenization, pooling and normalization)
  onnxruntime (--onnx)   the underlying BertModel exported with torch.onnx.export to
                         .data/cache/minilm.onnx, run over length-sorted padded batches of the
                         same texts; tokenization (fast tokenizer), mean pooling and L2
                         normalization in numpy are inside the timed region too
  onnxruntime int8       (--onnx-int8) the same ONNX file through onnxruntime's
                         quantize_dynamic(weight_type=QInt8) with its defaults, what a CPU user
                         would pick; run and timed as above, with its embedding cosine to
                         sentence-transformers (min) reported

tokens = real (non-padding) tokens after truncation to --max-tokens, including [CLS]/[SEP],
i.e. what an unpadded engine processes. Each engine: one warm-up pass over the first
--warmup-docs documents, then --repeat full passes; the best wall time is reported.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def load_texts(path, limit=None):
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                texts.append(json.loads(line)["text"])
                if limit and len(texts) >= limit:
                    break
    return texts


def timed(fn, repeat, warmup_fn):
    warmup_fn()
    runs = []
    out = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return out, runs


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(engine, args, n_docs, n_tokens, runs, extra=None, as_json=False):
    best = min(runs)
    rec = {
        "engine": engine,
        "model": os.path.basename(os.path.normpath(args.model)),
        "input": args.input,
        "docs": n_docs,
        "tokens": n_tokens,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "dtype": "f32",
        "wall_s": round(best, 4),
        "runs_s": [round(r, 4) for r in runs],
        "tokens_per_s": round(n_tokens / best, 1),
        "docs_per_s": round(n_docs / best, 2),
        "cpu": cpu_name(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
    }
    if extra:
        rec.update(extra)
    if as_json:
        print(json.dumps(rec), flush=True)
    else:
        print(f"{engine:22s} docs={n_docs} tokens={n_tokens} max_tokens={args.max_tokens} "
              f"threads={args.threads} batch={args.batch_size}  wall={best:.3f}s "
              f"(runs {', '.join(f'{r:.3f}' for r in runs)})  "
              f"{rec['tokens_per_s']:.0f} tokens/s  {rec['docs_per_s']:.1f} docs/s", flush=True)
        for k, v in (extra or {}).items():
            print(f"{'':22s} {k}: {v}", flush=True)
    return rec


# ---------------------------------------------------------------------------------------------
# ONNX


def export_onnx(bert, path, opset=17):
    """Export a transformers BertModel (fp32) with dynamic batch and sequence axes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    bert = bert.float().eval()
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.int64)
    mask = (ids != 0).to(torch.int64)
    mask[1, 3] = 0
    tt = torch.zeros_like(ids)

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    tmp = path + ".tmp"
    with torch.no_grad():
        torch.onnx.export(
            Wrapper(bert), (ids, mask, tt), tmp,
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["last_hidden_state"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "token_type_ids": {0: "batch", 1: "sequence"},
                "last_hidden_state": {0: "batch", 1: "sequence"},
            },
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    os.replace(tmp, path)


def onnx_encode(sess, tokenizer, texts, max_tokens, batch_size):
    """Length-sorted padded batches -> last_hidden_state -> masked mean -> L2 normalize."""
    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=max_tokens,
                                           add_special_tokens=True)["input_ids"]]
    order = np.argsort(-np.asarray(lengths), kind="stable")
    rows = [None] * len(texts)
    for s in range(0, len(texts), batch_size):
        idx = order[s:s + batch_size]
        enc = tokenizer([texts[i] for i in idx], truncation=True, max_length=max_tokens,
                        padding=True, return_tensors="np")
        mask = enc["attention_mask"].astype(np.int64)
        (hidden,) = sess.run(None, {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": mask,
            "token_type_ids": np.zeros_like(mask),
        })
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        for j, i in enumerate(idx):
            rows[i] = pooled[j]
    return np.stack(rows)


# ---------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="sentence-transformers folder (all-MiniLM-L6-v2)")
    ap.add_argument("--input", required=True, help="JSONL with a `text` field per line")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--warmup-docs", type=int, default=128, help="docs in the warm-up pass (0 = all)")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N docs")
    ap.add_argument("--onnx", action="store_true", help="also run the ONNX Runtime engine")
    ap.add_argument("--onnx-int8", action="store_true",
                    help="also run ONNX Runtime on the model quantized by quantize_dynamic (QInt8)")
    ap.add_argument("--onnx-path", default=os.path.join(REPO_ROOT, ".data/cache/minilm.onnx"))
    ap.add_argument("--reexport", action="store_true", help="re-export the ONNX file even if present")
    ap.add_argument("--json", action="store_true", help="one JSON object per engine on stdout")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.manual_seed(0)

    from sentence_transformers import SentenceTransformer
    import transformers
    transformers.logging.set_verbosity_error()

    texts = load_texts(args.input, args.limit)
    warm = texts if args.warmup_docs == 0 else texts[:args.warmup_docs]

    model = SentenceTransformer(args.model, device="cpu")
    model.float()  # a bf16 checkpoint (the BERT-base benchmark's) runs in fp32 like the others
    model.eval()
    model.max_seq_length = args.max_tokens
    tokenizer = model.tokenizer
    # tokenizer.json of all-MiniLM-L6-v2 carries truncation 128 / padding Fixed(128); the
    # transformers tokenizer call below overrides both, as sentence-transformers does.
    n_tokens = sum(len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_tokens,
                                               add_special_tokens=True)["input_ids"])
    log(f"bench_torch: {len(texts)} docs, {n_tokens} tokens (<= {args.max_tokens} each, with specials), "
        f"threads={args.threads}, batch={args.batch_size}, torch {torch.__version__}")

    def st_run(tx):
        with torch.inference_mode():
            return model.encode(tx, batch_size=args.batch_size, convert_to_numpy=True,
                                show_progress_bar=False)

    st_emb, runs = timed(lambda: st_run(texts), args.repeat, lambda: st_run(warm))
    # ONNX embeddings are L2-normalised; a folder without modules.json (the BERT-base benchmark's)
    # gets no Normalize module from sentence-transformers, so compare unit vectors.
    st_unit = st_emb / np.clip(np.linalg.norm(st_emb, axis=1, keepdims=True), 1e-12, None)
    report("sentence-transformers", args, len(texts), n_tokens, runs,
           {"sentence_transformers": __import__("sentence_transformers").__version__,
            "transformers": transformers.__version__}, args.json)

    if args.onnx or args.onnx_int8:
        import onnxruntime as ort

        if args.reexport or not os.path.exists(args.onnx_path):
            log(f"bench_torch: exporting ONNX to {args.onnx_path}")
            # a separate fp32 copy with eager attention: a plain MatMul/Softmax graph
            from transformers import AutoModel
            export_onnx(AutoModel.from_pretrained(args.model, attn_implementation="eager"), args.onnx_path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(args.onnx_path, so, providers=["CPUExecutionProvider"])

        def ort_run(tx):
            return onnx_encode(sess, tokenizer, tx, args.max_tokens, args.batch_size)

        if args.onnx:
            ort_emb, runs = timed(lambda: ort_run(texts), args.repeat, lambda: ort_run(warm))
            diff = float(np.max(np.abs(ort_emb.astype(np.float64) - st_unit.astype(np.float64))))
            log(f"bench_torch: onnxruntime vs sentence-transformers max abs diff {diff:.3e}")
            report("onnxruntime", args, len(texts), n_tokens, runs,
                   {"onnxruntime": ort.__version__, "max_abs_diff_vs_st": diff}, args.json)
            if diff > 1e-4:
                log("bench_torch: WARNING: ONNX embeddings differ from sentence-transformers by > 1e-4")
                sys.exit(1)
        if args.onnx_int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            int8_path = args.onnx_path.replace(".onnx", ".int8.onnx")
            if args.reexport or not os.path.exists(int8_path):
                log(f"bench_torch: quantize_dynamic -> {int8_path}")
                quantize_dynamic(args.onnx_path, int8_path, weight_type=QuantType.QInt8)
            qsess = ort.InferenceSession(int8_path, so, providers=["CPUExecutionProvider"])
            q_emb, runs = timed(lambda: onnx_encode(qsess, tokenizer, texts, args.max_tokens, args.batch_size),
                                args.repeat,
                                lambda: onnx_encode(qsess, tokenizer, warm, args.max_tokens, args.batch_size))
            a, b = q_emb.astype(np.float64), st_unit.astype(np.float64)
            cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            log(f"bench_torch: onnxruntime int8 vs sentence-transformers cosine min {cos.min():.5f}")
            report("onnxruntime-int8", args, len(texts), n_tokens, runs,
                   {"onnxruntime": ort.__version__, "cosine_min_vs_st": float(cos.min()),
                    "cosine_p1_vs_st": float(np.percentile(cos, 1))}, args.json)


if __name__ == "__main__":
    main()
