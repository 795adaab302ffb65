"""Fake-quantization probe for the CPU's int8 path: how far each quantization scheme moves
all-MiniLM-L6-v2's mean-pooled embeddings from f32, before writing a kernel for it.

Every encoder linear map's weight is rounded as the scheme says (int8, per output channel or per
group of G consecutive inputs) and its input is rounded per token, or per token and group of A
inputs (16-bit symmetric, 8-bit symmetric, or 8-bit asymmetric with a zero point: mira's int8
path rounds 8-bit asymmetric per token and 64 inputs, weights per 64 inputs), optionally after a
SmoothQuant-style per-input-channel migration calibrated on documents disjoint from the ones
measured. Weights can also be rounded GPTQ-style (each input column in turn, its error spread
over the columns not yet rounded through the calibration inputs' second moments). The arithmetic
itself stays float (PyTorch), so this measures rounding only.

usage: python benches/reference/int8_fake_quant.py [MODEL] [CORPUS]
  (defaults .data/models/all-MiniLM-L6-v2, .data/sample/corpus.jsonl; needs torch and
  transformers: /root/venv-ref/bin/python)
  CALIBRATION=builtin calibrates on mira's own six texts (src/scorer/calibration.rs, what the
  engine uses) instead of 30 sample-corpus documents; ONLY=16bit runs only the first five rows (mira's
  int8, 16-bit inputs, 16-bit inputs with GPTQ weights: BENCHMARKS.md, 2026-12-03).
Prints one line per scheme: embedding cosine to f32, min / p1 / mean over 100 documents, and
the error of a random 8-label head on the BERT pooler output (tanh(P·h_CLS + p), weights uniform
in ±2/√H as tests/precision.rs draws them, another seed): per label the largest difference as a
share of the label's range over the documents, the largest and the mean over labels.
"""

import json
import os
import re
import sys

import torch
from transformers import AutoModel, AutoTokenizer

MODEL = sys.argv[1] if len(sys.argv) > 1 else ".data/models/all-MiniLM-L6-v2"
CORPUS = sys.argv[2] if len(sys.argv) > 2 else ".data/sample/corpus.jsonl"
torch.set_num_threads(2)
tok = AutoTokenizer.from_pretrained(MODEL)
model = AutoModel.from_pretrained(MODEL).eval()
texts = [json.loads(line)["text"] for line in open(CORPUS)]
measured = [tok(t, truncation=True, max_length=256, return_tensors="pt") for t in texts[:200:2]]


def builtin_calibration_texts():
    """mira's calibration texts, read from the Rust source (string literals with `\` line
    continuations and `\n`, `\x20`, `\"` escapes)."""
    src = open("src/scorer/calibration.rs").read()
    body = src[src.index("const TEXTS") :]
    body = body[body.index("[") + 1 : body.index("];")]
    out = []
    for m in re.finditer(r'"((?:[^"\\]|\\.|\\\n)*)"', body, re.S):
        s = re.sub(r"\\\n\s*", "", m.group(1))
        for a, b in (("\\n", "\n"), ("\\x20", " "), ('\\"', '"'), ("\\'", "'"), ("\\\\", "\\")):
            s = s.replace(a, b)
        out.append(s)
    assert len(out) == 6, f"expected mira's six calibration texts, parsed {len(out)}"
    return out


if os.environ.get("CALIBRATION") == "builtin":
    calibration_texts = builtin_calibration_texts()
else:
    calibration_texts = texts[1:60:2]
calibration = [tok(t, truncation=True, max_length=256, return_tensors="pt") for t in calibration_texts]
linears = {
    name: m
    for name, m in model.named_modules()
    if isinstance(m, torch.nn.Linear) and "encoder" in name
}
original = {name: m.weight.detach().clone() for name, m in linears.items()}


def kind(name):
    if "attention.self" in name:
        return "qkv"
    if "attention.output" in name:
        return "attn_out"
    if "intermediate" in name:
        return "ffn_up"
    return "ffn_down"


def embed(inputs):
    """Mean-pooled embeddings and pooler outputs."""
    with torch.no_grad():
        outs = [model(**e) for e in inputs]
    mean = torch.stack([o.last_hidden_state[0].mean(0) for o in outs])
    return mean, torch.stack([o.pooler_output[0] for o in outs])


reference, reference_pooler = embed(measured)
seed = torch.Generator().manual_seed(5)
hidden = reference_pooler.shape[1]
head = (torch.rand(8, hidden, generator=seed) * 2 - 1) * 2 / hidden**0.5
reference_labels = reference_pooler @ head.T
# Per-input-channel largest magnitude of each linear map's input, on the calibration documents,
# and the inputs' second moments X^T X (float64) for GPTQ-style rounding.
input_max = {}
second_moment = {}
hooks = []
for name, m in linears.items():
    def record(_m, inputs, _out, name=name):
        x = inputs[0].reshape(-1, inputs[0].shape[-1])
        a = x.abs().amax(0)
        input_max[name] = a if name not in input_max else torch.maximum(input_max[name], a)
        xx = x.double().T @ x.double()
        second_moment[name] = xx if name not in second_moment else second_moment[name] + xx
    hooks.append(m.register_forward_hook(record))
embed(calibration)
for h in hooks:
    h.remove()


def round_weight(w, group, top=127):
    rows, cols = w.shape
    g = cols if group == 0 else group
    pad = (-cols) % g
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(rows, -1, g)
    s = wg.abs().amax(2, keepdim=True).clamp_min(1e-12) / top
    return ((wg / s).round().clamp(-top, top) * s).reshape(rows, -1)[:, :cols]


def round_weight_gptq(w, group, xx, damp=0.01):
    """GPTQ (Frantar et al. 2022): round one input column at a time, in order, and spread each
    column's rounding error over the columns not yet rounded through the inverse of the inputs'
    second moments `xx`, so that X·Wq stays close to X·W on the calibration inputs. A group's
    scale is taken from its columns as they stand when the group starts."""
    w = w.double().clone()
    rows, cols = w.shape
    g = cols if group == 0 else group
    h = xx.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i in range(cols):
        if i % g == 0:
            s = w[:, i : i + g].abs().amax(1).clamp_min(1e-12) / 127
        qi = (w[:, i] / s).round().clamp(-127, 127) * s
        q[:, i] = qi
        err = (w[:, i] - qi) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
    return q.float()


def round_weight_pairs(w, group, limit=128):
    """Per group of `group` inputs, each pair of neighbouring weights (2j, 2j+1) rounded so that
    |qa| + |qb| <= limit, which keeps AVX2's vpmaddubsw of u8 activations (0..255) exact without
    mira's vpsignb: a pair over the limit is moved onto it (both magnitudes lowered equally), and
    the group's scale is the best of 21 (max/127 times 1.00, 1.05, .., 2.00) by squared error."""
    rows, cols = w.shape
    pad = (-cols) % group
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(rows, -1, group // 2, 2).double()
    amax = wg.abs().amax((2, 3), keepdim=True).clamp_min(1e-12)
    best, best_err = None, None
    for c in (1 + 0.05 * i for i in range(21)):
        s = amax / 127 * c
        x = (wg / s).abs()
        y = x - (x.sum(-1, keepdim=True) - limit).clamp_min(0) / 2
        ya = y[..., :1].round().clamp(0, 127)
        yb = torch.minimum(y[..., 1:].round(), limit - ya).clamp(0, 127)
        r = torch.cat([ya, yb], -1) * wg.sign() * s
        err = ((r - wg) ** 2).sum((2, 3), keepdim=True)
        if best is None:
            best, best_err = r, err
        else:
            best = torch.where(err < best_err, r, best)
            best_err = torch.minimum(err, best_err)
    return best.reshape(rows, -1)[:, :cols].float()


def round_input(x, mode):
    if mode == "f32":
        return x
    if mode in ("i16", "s8"):
        top = 32767 if mode == "i16" else 127
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
        return (x / s).round().clamp(-top, top) * s
    # "u8": asymmetric over the range widened to hold 0 (as mira's), with an integer zero point;
    # "u7": the same on 0..127 (what would let AVX2's vpmaddubsw skip mira's vpsignb).
    top = 127 if mode == "u7" else 255
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    s = (hi - lo).clamp_min(1e-12) / top
    z = (-lo / s).round()
    return ((x / s).round() + z).clamp(0, top).sub(z) * s


def round_input_grouped(x, mode, act_group):
    """round_input over each group of `act_group` inputs of a token (0: the whole token)."""
    cols = x.shape[-1]
    if act_group == 0 or act_group >= cols:
        return round_input(x, mode)
    pad = (-cols) % act_group
    xg = torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, act_group)
    return round_input(xg, mode).reshape(*x.shape[:-1], -1)[..., :cols]


def scheme(label, inputs, group=0, keep_f32=(), smooth=None, act_group=0, gptq=False, cls_exact=False, limit=None, damp=0.01):
    """inputs: per-token rounding of every input; group: weight group (0 = per channel);
    keep_f32: kinds left unquantized; smooth: SmoothQuant alpha, or None; act_group: inputs
    per activation scale (0 = one per token); gptq: round the weights GPTQ-style; cls_exact: leave
    every sequence's first token (the one the pooler reads) unrounded; limit: "pairs" rounds the
    weights with round_weight_pairs, "7-bit" within ±63; damp: GPTQ's damping (share of the mean
    diagonal)."""
    for name, m in linears.items():
        w = original[name]
        if kind(name) in keep_f32:
            m.weight.data.copy_(w)
            m.forward = torch.nn.Linear.forward.__get__(m)
            continue
        factor = None
        if smooth is not None:
            factor = input_max[name].clamp_min(1e-5) ** smooth / w.abs().amax(0).clamp_min(
                1e-5
            ) ** (1 - smooth)
        ws = w * factor if factor is not None else w
        if gptq:
            f = factor.double() if factor is not None else torch.ones(w.shape[1], dtype=torch.float64)
            wq = round_weight_gptq(ws, group, second_moment[name] / f[:, None] / f[None, :], damp)
        elif limit == "7-bit":
            wq = round_weight(ws, group, top=63)
        elif limit == "pairs":
            wq = round_weight_pairs(ws, group)
        else:
            wq = round_weight(ws, group)

        def forward(x, m=m, wq=wq, factor=factor):
            x = x / factor if factor is not None else x
            rounded = round_input_grouped(x, inputs, act_group)
            if cls_exact:
                rounded[..., 0, :] = x[..., 0, :]
            x = rounded
            return torch.nn.functional.linear(x, wq, m.bias)

        m.forward = forward
    mean, pooler = embed(measured)
    cos = torch.nn.functional.cosine_similarity(mean, reference)
    spread = reference_labels.amax(0) - reference_labels.amin(0)
    share = ((pooler @ head.T) - reference_labels).abs().amax(0) / spread
    print(
        f"{label:58s} min {float(cos.min()):.6f}  p1 {float(cos.quantile(0.01)):.6f}"
        f"  mean {float(cos.mean()):.6f}  label max {100 * float(share.max()):.2f}%"
        f" mean {100 * float(share.mean()):.2f}%",
        flush=True,
    )


# mira's int8 and the same with 16-bit inputs, then whether 16-bit inputs with GPTQ weights meet
# the 1% label bound, and on which calibration text (run once with CALIBRATION=builtin, once
# without); ONLY=16bit stops after these rows.
scheme("weights and 8-bit asymmetric inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64)
scheme("weights per 64, SmoothQuant 0.5, 16-bit inputs per 64", "i16", 64, smooth=0.5, act_group=64)
for d in (0.01, 0.03, 0.1):
    scheme(f"16-bit inputs per 64, GPTQ weights per 64 (damping {d}), SQ 0.5", "i16", 64, smooth=0.5, act_group=64, gptq=True, damp=d)
if os.environ.get("ONLY") == "16bit":
    sys.exit(0)
scheme("weights per channel, 16-bit inputs", "i16")
scheme("weights per channel, 16-bit inputs, ffn_down f32", "i16", keep_f32=("ffn_down",))
for g in (128, 64, 32):
    scheme(f"weights per {g} inputs, 16-bit inputs (mira's int8: 64)", "i16", group=g)
scheme("weights per channel, 8-bit symmetric inputs", "s8")
scheme("weights per channel, 8-bit asymmetric inputs", "u8")
for alpha in (0.4, 0.5, 0.6):
    scheme(f"8-bit asymmetric inputs, SmoothQuant alpha {alpha}", "u8", smooth=alpha)
scheme("8-bit asymmetric inputs, SmoothQuant 0.5, weights per 64", "u8", group=64, smooth=0.5)
scheme("weights per 64, 8-bit symmetric inputs", "s8", group=64)
scheme("weights per 64, 8-bit asymmetric inputs", "u8", group=64)
for a in (128, 64, 32):
    scheme(f"weights per 64, 8-bit symmetric inputs per {a}", "s8", group=64, act_group=a)
    scheme(
        f"weights per 64, 8-bit asymmetric inputs per {a} (mira's int8: 64)",
        "u8",
        group=64,
        act_group=a,
    )
# Which part of the int8 error the pooler head sees: one kind of layer left f32 at a time, the
# activations exact (weight rounding alone) with finer weight groups, and 16-bit activations.
for k in ("qkv", "attn_out", "ffn_up", "ffn_down"):
    scheme(f"mira's int8, {k} left f32", "u8", 64, keep_f32=(k,), smooth=0.5, act_group=64)
scheme("weights per 64, no smoothing, inputs exact", "f32", 64)
for g in (64, 32, 16):
    scheme(f"weights per {g}, SmoothQuant 0.5, inputs exact", "f32", g, smooth=0.5)
# Error-compensating weight rounding (GPTQ) on the same calibration documents.
scheme("GPTQ weights per 64, no smoothing, inputs exact", "f32", 64, gptq=True)
scheme("GPTQ weights per 64, SmoothQuant 0.5, inputs exact", "f32", 64, smooth=0.5, gptq=True)
scheme("GPTQ, weights and 8-bit asymmetric inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64, gptq=True)
scheme("GPTQ, weights and 8-bit asymmetric inputs per 64, no smoothing", "u8", 64, act_group=64, gptq=True)
for a in (0.6, 0.7, 0.8):
    scheme(f"GPTQ, weights and u8 inputs per 64, SmoothQuant {a}", "u8", 64, smooth=a, act_group=64, gptq=True)
scheme("GPTQ, weights and u8 inputs per 32, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=32, gptq=True)
# Whether the pooler's error comes through the first token's own rounding.
scheme("CLS exact: weights and u8 inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64, cls_exact=True)
scheme("CLS exact: GPTQ, weights and u8 inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64, gptq=True, cls_exact=True)
# Cheaper exact AVX2 kernels than mira's vpsignb + vpmaddubsw need 7-bit weights, 7-bit
# activations or weights whose neighbouring pairs stay within 128 (BENCHMARKS.md, "int8 on
# AVX2: BERT-base, the GEMM table, two kernels tried, and what one vector op less would cost").
scheme("7-bit weights (±63) per 64, u8 inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64, limit="7-bit")
scheme("u7 inputs per 64, weights per 64, SmoothQuant 0.5", "u7", 64, smooth=0.5, act_group=64)
scheme("u7 inputs per 32, weights per 64, SmoothQuant 0.5", "u7", 64, smooth=0.5, act_group=32)
scheme("weight pairs within 128, u8 inputs per 64, SmoothQuant 0.5", "u8", 64, smooth=0.5, act_group=64, limit="pairs")
scheme("weight pairs within 128, SmoothQuant 0.5, inputs exact", "f32", 64, smooth=0.5, limit="pairs")
