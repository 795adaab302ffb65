#!/usr/bin/env python3
"""Public-classifier architectures on the CPU: mira against PyTorch and ONNX Runtime, same texts, one run.

usage:
    /root/venv-ref/bin/python benches/classifiers/cpu_vs_torch.py --arch {deberta,xlmr,gte}
        [--docs 48] [--threads 2] [--repeat 2] [--batch-size 8] [--no-onnx]

What it does:
  1. makes (once, in .data/bench/<arch>-base-shape) a random classifier with the shape of the public
     checkpoints of that architecture, f32, 3 labels, with the tokenizer of the matching test fixture (the
     vocabulary size changes only the embedding lookup, not the compute):
       deberta  DebertaV2ForSequenceClassification, deberta-v3-base's shape (hidden 768, 12 layers, 12 heads,
                FFN 3072, position_buckets 256, max_relative_positions 512, c2p + p2c, shared projections,
                LayerNorm'd relative embeddings): NeMo Curator's quality/domain classifiers' backbone;
       xlmr     XLMRobertaForSequenceClassification, xlm-roberta-base's shape (768, 12 layers, 12 heads, FFN
                3072): multilingual raters;
       gte      NewForSequenceClassification, gte-base-en-v1.5's shape (768, 12 layers, 12 heads, gated FFN
                3072, rotary theta 500,000 with NTK factor 2): WebOrganizer's topic and format classifiers;
  2. takes the first --docs documents of the sample corpus, truncated at 512 tokens;
  3. times `mira bench` (the engine alone, pre-tokenized) and `mira score` (the whole job), and the peer a
     user would run: transformers (deberta, xlmr: its default attention, SDPA where it has one) or, for GTE,
     whose modeling code is not in transformers (it is `trust_remote_code` from the hub, which this machine
     cannot reach), a PyTorch port of that published code (tests/fixtures/make_gte.py's forward pass, in
     torch, padded batches, SDPA); fp32, length-sorted padded batches of --batch-size,
     torch.inference_mode, tokenization inside the timed region; then the same module exported with
     torch.onnx.export and run by ONNX Runtime (skipped, with the reason, where export fails);
  4. checks that mira's probabilities equal the peer's.
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
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "models")
CORPUS = os.path.join(REPO, ".data", "sample", "corpus.jsonl")
MIRA = os.environ.get("MIRA", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")),
                                           "release", "mira"))
LABELS = {0: "High", 1: "Medium", 2: "Low"}
sys.path.insert(0, os.path.join(REPO, "tests", "fixtures"))


def copy_tokenizer(fixture, dest):
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(os.path.join(FIXTURES, fixture)):
        if f.startswith(("tokenizer", "special_tokens", "vocab", "sentencepiece")):
            shutil.copy(os.path.join(FIXTURES, fixture, f), os.path.join(dest, f))
    return json.load(open(os.path.join(FIXTURES, fixture, "config.json")))["vocab_size"]


def make_deberta(dest):
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification
    vocab = copy_tokenizer("deberta-v3-cls", dest)
    cfg = DebertaV2Config(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, max_position_embeddings=512, relative_attention=True,
                          position_buckets=256, max_relative_positions=512, pos_att_type=["p2c", "c2p"],
                          share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                          type_vocab_size=0, layer_norm_eps=1e-7, pad_token_id=0, num_labels=3, id2label=LABELS)
    torch.manual_seed(0)
    DebertaV2ForSequenceClassification(cfg).eval().save_pretrained(dest, safe_serialization=True)


def make_xlmr(dest):
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification
    vocab = copy_tokenizer("xlmr-cls-single", dest)
    cfg = XLMRobertaConfig(vocab_size=vocab, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                           intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
                           layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2, num_labels=3,
                           id2label=LABELS)
    torch.manual_seed(0)
    XLMRobertaForSequenceClassification(cfg).eval().save_pretrained(dest, safe_serialization=True)


GTE_CONFIG = dict(model_type="new", architectures=["NewForSequenceClassification"], max_position_embeddings=8192,
                  hidden_act="gelu", layer_norm_eps=1e-12, position_embedding_type="rope", pack_qkv=True,
                  layer_norm_type="layer_norm", logn_attention_scale=False, pad_token_id=0, hidden_size=768,
                  num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, type_vocab_size=0,
                  rope_theta=500000.0, rope_scaling={"type": "ntk", "factor": 2.0},
                  problem_type="single_label_classification", id2label={str(k): v for k, v in LABELS.items()},
                  label2id={v: k for k, v in LABELS.items()}, num_labels=3)


def make_gte(dest):
    from safetensors.numpy import save_file
    vocab = copy_tokenizer("gte-cls-ntk", dest)
    cfg = dict(GTE_CONFIG, vocab_size=vocab)
    h, inter, rng = cfg["hidden_size"], cfg["intermediate_size"], np.random.default_rng(0)
    shapes = {"new.embeddings.word_embeddings.weight": (vocab, h), "new.embeddings.LayerNorm.weight": (h,),
              "new.embeddings.LayerNorm.bias": (h,), "new.pooler.dense.weight": (h, h), "new.pooler.dense.bias": (h,),
              "classifier.weight": (3, h), "classifier.bias": (3,)}
    for i in range(cfg["num_hidden_layers"]):
        n = f"new.encoder.layer.{i}."
        shapes.update({n + "attention.qkv_proj.weight": (3 * h, h), n + "attention.qkv_proj.bias": (3 * h,),
                       n + "attention.o_proj.weight": (h, h), n + "attention.o_proj.bias": (h,),
                       n + "attn_ln.weight": (h,), n + "attn_ln.bias": (h,),
                       n + "mlp.up_gate_proj.weight": (2 * inter, h), n + "mlp.down_proj.weight": (h, inter),
                       n + "mlp.down_proj.bias": (h,), n + "mlp_ln.weight": (h,), n + "mlp_ln.bias": (h,)})
    tensors = {}
    for name, shape in shapes.items():
        norm = name.endswith(("LayerNorm.weight", "_ln.weight"))
        tensors[name] = ((1.0 if norm else 0.0) + 0.02 * rng.standard_normal(shape)).astype(np.float32)
    save_file(tensors, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


class Gte(torch.nn.Module):
    """gte-base-en-v1.5's NewForSequenceClassification in PyTorch, from the published modeling code (as
    tests/fixtures/make_gte.py's float64 reference): padded batches, SDPA with the padding mask."""

    def __init__(self, folder):
        super().__init__()
        from safetensors.torch import load_file
        import make_gte
        self.cfg = json.load(open(os.path.join(folder, "config.json")))
        self.w = {k: v.float() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
        h, nh = self.cfg["hidden_size"], self.cfg["num_attention_heads"]
        self.inv_freq = torch.tensor(make_gte.inv_freq(self.cfg, h // nh), dtype=torch.float32)

    def forward(self, input_ids, attention_mask):
        w, c = self.w, self.cfg
        h, nh, inter, eps = c["hidden_size"], c["num_attention_heads"], c["intermediate_size"], c["layer_norm_eps"]
        d, (b, t) = h // nh, input_ids.shape
        ln = torch.nn.functional.layer_norm
        x = ln(w["new.embeddings.word_embeddings.weight"][input_ids], (h,), w["new.embeddings.LayerNorm.weight"],
               w["new.embeddings.LayerNorm.bias"], eps)
        freqs = torch.outer(torch.arange(t, dtype=torch.float32), self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # [1, 1, T, d]

        def rotate(v):
            return v * cos + torch.cat([-v[..., d // 2:], v[..., :d // 2]], dim=-1) * sin

        mask = attention_mask[:, None, None, :].bool()
        for i in range(c["num_hidden_layers"]):
            n = f"new.encoder.layer.{i}."
            qkv = torch.nn.functional.linear(x, w[n + "attention.qkv_proj.weight"], w[n + "attention.qkv_proj.bias"])
            q, k, v = (qkv[..., j * h:(j + 1) * h].view(b, t, nh, d).transpose(1, 2) for j in range(3))
            ctx = torch.nn.functional.scaled_dot_product_attention(rotate(q), rotate(k), v, attn_mask=mask)
            ctx = ctx.transpose(1, 2).reshape(b, t, h)
            attn = torch.nn.functional.linear(ctx, w[n + "attention.o_proj.weight"], w[n + "attention.o_proj.bias"])
            x = ln(x + attn, (h,), w[n + "attn_ln.weight"], w[n + "attn_ln.bias"], eps)
            up_gate = torch.nn.functional.linear(x, w[n + "mlp.up_gate_proj.weight"])
            up, gate = up_gate[..., :inter], up_gate[..., inter:]
            mlp = torch.nn.functional.linear(torch.nn.functional.gelu(gate) * up, w[n + "mlp.down_proj.weight"],
                                             w[n + "mlp.down_proj.bias"])
            x = ln(x + mlp, (h,), w[n + "mlp_ln.weight"], w[n + "mlp_ln.bias"], eps)
        pooled = torch.tanh(torch.nn.functional.linear(x[:, 0], w["new.pooler.dense.weight"],
                                                       w["new.pooler.dense.bias"]))
        return torch.nn.functional.linear(pooled, w["classifier.weight"], w["classifier.bias"])


class Logits(torch.nn.Module):
    """A transformers classifier as (input_ids, attention_mask) -> logits, for export and timing alike."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask):
        return self.m(input_ids=input_ids, attention_mask=attention_mask).logits


ARCHS = {
    "deberta": (make_deberta, "transformers eager fp32 (DeBERTa-v2 has no SDPA path)"),
    "xlmr": (make_xlmr, "transformers sdpa fp32"),
    "gte": (make_gte, "PyTorch port of the published GTE code, sdpa fp32"),
}


def peer_module(arch, folder):
    if arch == "gte":
        return Gte(folder).eval()
    attn = "eager" if arch == "deberta" else "sdpa"
    return Logits(AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation=attn).eval())


def padded_batches(tok, texts, order, batch_size, tensors):
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        b = tok([texts[i] for i in idx], truncation=True, max_length=512, padding=True, return_tensors=tensors)
        yield idx, b["input_ids"], b["attention_mask"]


def best_of(repeat, run):
    run()  # warm-up
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        runs.append(time.perf_counter() - t)
    return round(min(runs), 3)


def onnx_session(module, folder, threads):
    import onnxruntime as ort
    path = os.path.join(folder, "model.onnx")
    if not os.path.exists(path):
        ids = torch.tensor([[2, 40, 41, 3], [2, 42, 3, 0]], dtype=torch.int64)
        mask = (ids != 0).to(torch.int64)
        with torch.no_grad():
            torch.onnx.export(module, (ids, mask), path + ".tmp", input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], opset_version=17, do_constant_folding=True, dynamo=False,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "attention_mask": {0: "batch", 1: "sequence"},
                                            "logits": {0: "batch"}})
        os.replace(path + ".tmp", path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), required=True)
    ap.add_argument("--docs", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    args = ap.parse_args()
    make, peer_name = ARCHS[args.arch]
    folder = os.path.join(REPO, ".data", "bench", f"{args.arch}-base-shape")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        make(folder)
    texts = []
    with open(CORPUS, encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) == args.docs:
                break
    subset = os.path.join(REPO, ".data", "bench", f"docs-{args.docs}.jsonl")
    with open(subset, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            f.write(json.dumps({"id": str(i), "text": t}) + "\n")
    tok = AutoTokenizer.from_pretrained(folder)
    n_tokens = sum(len(x) for x in tok(texts, truncation=True, max_length=512)["input_ids"])
    results = []

    def emit(rec):
        rec.update({"arch": args.arch, "docs": len(texts), "tokens": n_tokens, "threads": args.threads,
                    "tokens_per_s": round(n_tokens / rec["wall_s"], 1),
                    "docs_per_s": round(len(texts) / rec["wall_s"], 2)})
        results.append(rec)
        print(json.dumps(rec), flush=True)

    # mira: the engine alone, then the whole job.
    common = ["--device", "cpu", "--threads", str(args.threads), "--max-tokens", "512"]
    out = subprocess.run([MIRA, "bench", "--model", folder, "--input", subset, "--repeat", str(args.repeat),
                          "--json"] + common, check=True, capture_output=True, text=True).stdout
    bench = json.loads(out)
    assert bench["tokens"] == n_tokens, (bench["tokens"], n_tokens)
    emit({"engine": "mira bench (engine)", "wall_s": round(n_tokens / bench["tokens_per_s"], 3)})
    scores = os.path.join(REPO, ".data", "bench", f"{args.arch}-scores.jsonl")

    def mira_score():
        subprocess.run([MIRA, "score", "--model", folder, "--input", subset, "--output", scores] + common,
                       check=True, stderr=subprocess.DEVNULL)

    emit({"engine": "mira score (whole job)", "wall_s": best_of(args.repeat - 1, mira_score)})

    torch.set_num_threads(args.threads)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    module = peer_module(args.arch, folder)
    logits = [None] * len(texts)

    def run_torch():
        with torch.inference_mode():
            for idx, ids, mask in padded_batches(tok, texts, order, args.batch_size, "pt"):
                out = module(ids, mask)
                for k, i in enumerate(idx):
                    logits[i] = out[k].numpy()

    emit({"engine": f"{peer_name}, padded batches of {args.batch_size}", "wall_s": best_of(args.repeat, run_torch)})
    mira_rows = [json.loads(line) for line in open(scores)]
    got = np.array([[r["scores"][LABELS[k]] for k in range(3)] for r in mira_rows])
    want = torch.softmax(torch.tensor(np.array(logits)), dim=-1).numpy()
    print(json.dumps({"max_abs_prob_diff_mira_vs_peer": float(np.abs(got - want).max())}), flush=True)

    if not args.no_onnx:
        try:
            sess = onnx_session(module, folder, args.threads)
        except Exception as e:  # export is the peer's limit, reported rather than fatal
            print(json.dumps({"engine": "onnxruntime fp32", "skipped": f"{type(e).__name__}: {e}"[:300]}))
        else:
            ort_logits = [None] * len(texts)

            def run_ort():
                for idx, ids, mask in padded_batches(tok, texts, order, args.batch_size, "np"):
                    (out,) = sess.run(None, {"input_ids": ids.astype(np.int64),
                                             "attention_mask": mask.astype(np.int64)})
                    for k, i in enumerate(idx):
                        ort_logits[i] = out[k]

            emit({"engine": f"onnxruntime fp32, padded batches of {args.batch_size}",
                  "wall_s": best_of(args.repeat, run_ort)})
            diff = float(np.abs(np.array(ort_logits) - np.array(logits)).max())
            print(json.dumps({"max_abs_logit_diff_onnxruntime_vs_torch": diff}), flush=True)
    for r in results[:2]:
        for peer in results[2:]:
            print(f"{args.arch}: {r['engine']} / {peer['engine']}: {r['tokens_per_s'] / peer['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
