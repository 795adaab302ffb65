#!/usr/bin/env bash
# Every CUDA check and benchmark in one call, on a GPU machine that builds nothing: it takes the
# binaries made on a build machine by scripts/gpu_bundle.sh (no Rust toolchain needed here).
#
#   1. correctness: every CUDA op against the CPU op (bf16, f16, f32 storage; outputs poisoned
#      with NaN first) and whole models against CPU (MiniLM if bundled, the random BERT and
#      ModernBERT checkpoints of tests/fixtures), batched equal to single
#      (tests/cuda_ops.rs, tests/cuda_model.rs, run with MIRA_REQUIRE_CUDA=1 so nothing skips);
#   2. throughput, side by side on the same texts: mira (CUDA, f16 and bf16) vs transformers bf16 with
#      padded batches (eager attention: the FineWeb-Edu recipe) and with SDPA, on a BERT-base
#      shaped random checkpoint and on MiniLM (if bundled), 512-token truncation, a log-normal
#      length mix (benches/gpu/hf_bench.py); tokens/s, docs/s, MFU and the ratios;
#   3. small batches (one 128-token document each, where launches dominate): per-batch latency
#      op by op and with CUDA graphs (--cuda-graphs).
#
# usage (repo root of the GPU machine): benches/gpu/run.sh [BUNDLE]
#   BUNDLE  default .gpu: bin/{mira,cuda_ops,cuda_model}, optionally minilm/ (all-MiniLM-L6-v2);
#           with .gl/libvulkan1*.deb carried too, mira's wgpu backend is benchmarked as well
#   env     DOCS (default 20000) texts to benchmark; HF_BATCH (default 128) transformers' batch;
#           OUT (where results go, default /tmp/mira-gpu);
#           SKIP_CHECKS=1 or SKIP_BENCH=1 to run one half; KEEP_WORK=DIR keeps the models and
#           texts made for the benchmark there (default: a temporary folder, removed); STEP_S (default 150) limits each
#           check or benchmark command (timeout), so one hang cannot use up the whole call
# Needs python3 with torch + transformers and the CUDA 13 libraries cuBLASLt and NVRTC (found in
# the Python environment's nvidia wheels or /usr/local/cuda).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BUNDLE="${1:-.gpu}"
BIN="$BUNDLE/bin"
OUT="${OUT:-/tmp/mira-gpu}"
# No single check or benchmark may hang the whole (metered) call. --foreground keeps the command in
# this script's process group, so a limit on the whole script (session.sh) stops it too.
T="timeout --foreground -k 5 ${STEP_S:-150}"
DOCS="${DOCS:-20000}"
WORK="${KEEP_WORK:-$(mktemp -d)}"
mkdir -p "$WORK"
mkdir -p "$OUT"
status=0

libdirs=$(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]
found = []
for pattern in ("libcublasLt.so.13*", "libnvrtc.so.13*"):
    for root in roots:
        hits = glob.glob(os.path.join(root, "**", pattern), recursive=True)
        if hits:
            d = os.path.dirname(hits[0])
            if d not in found:
                found.append(d)
            break
    else:
        print(f"warning: {pattern} not found under {roots}", file=sys.stderr)
print(":".join(found))
PY
)
export LD_LIBRARY_PATH="$libdirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export MIRA_REPO="$PWD"
# wgpu on the GPU through NVIDIA's Vulkan driver, when the Vulkan loader was carried in .gl/
# (scripts/gpu_bundle.sh downloads libvulkan1): unpacked into /, as the device README says.
WGPU=0
if ls .gl/*.deb >/dev/null 2>&1; then
    for f in .gl/*.deb; do dpkg -x "$f" /; done
    ldconfig
    [ -e /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ] \
        && export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
    [ -e /usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json ] \
        && export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
    WGPU=1
fi
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
echo "# LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
"$BIN/mira" devices 2>&1 | grep -v XDG_RUNTIME
devices=$("$BIN/mira" devices 2>/dev/null)
if [ "$WGPU" = 1 ] && ! grep -q '^wgpu:' <<<"$devices"; then
    # No adapter: say why (the Vulkan loader's own account, the driver manifests, what the
    # driver library cannot find), then skip the wgpu benchmark.
    echo "# wgpu sees no adapter; VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
    ls /usr/local/nvidia/share/vulkan/icd.d /usr/share/vulkan/icd.d /etc/vulkan/icd.d 2>&1 | head
    VK_LOADER_DEBUG=error,warn,driver "$BIN/mira" devices 2>&1 | grep -iv XDG_RUNTIME | head -30
    for lib in $(ls /usr/local/nvidia/lib*/libGLX_nvidia.so.* /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.* 2>/dev/null | head -1); do
        ldd "$lib" | grep "not found"
    done
    WGPU=0
fi

MINILM=""
if [ -f "$BUNDLE/minilm/model.safetensors" ]; then
    MINILM="$BUNDLE/minilm"
    export MIRA_MINILM_DIR="$PWD/$MINILM"
fi

if [ "${SKIP_CHECKS:-0}" != 1 ]; then
    skip=()
    [ -z "$MINILM" ] && skip=(--skip minilm) && echo "# MiniLM not bundled: its model check is skipped"
    # (no `|| true` after these pipelines: under pipefail it would run and reset PIPESTATUS, so a
    # failed check would pass unnoticed)
    for t in cuda_ops cuda_model; do
        echo "## $t"
        MIRA_REQUIRE_CUDA=1 $T "$BIN/$t" --include-ignored --test-threads 1 --nocapture "${skip[@]}" 2>&1 | tee "$OUT/$t.log" \
            | grep -E '^test |test result|cosine|panicked|SKIPPED'
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
    echo "## cuda_ops attention with MIRA_CUDA_ATTENTION=scalar (the plain kernel in bf16/f16 too)"
    MIRA_CUDA_ATTENTION=scalar MIRA_REQUIRE_CUDA=1 $T "$BIN/cuda_ops" --include-ignored --test-threads 1 attention 2>&1 \
        | tee "$OUT/cuda_ops_scalar.log" | grep -E '^test |test result|panicked'
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    tok_src="${MINILM:-tests/fixtures/models/bert-cls-regression}"
    python3 benches/gpu/hf_bench.py make-model "$WORK/bert-base" --tokenizer-from "$tok_src" || status=1
    python3 benches/gpu/hf_bench.py make-texts "$WORK/texts.jsonl" --tokenizer "$WORK/bert-base" --docs "$DOCS" || status=1
    models=("bert-base=$WORK/bert-base")
    if [ -n "$MINILM" ]; then
        models+=("minilm=$MINILM")
    else  # the real model did not fit the transfer: its shape with random weights, same throughput
        python3 benches/gpu/hf_bench.py make-model "$WORK/minilm-shape" --shape minilm --tokenizer-from "$tok_src" \
            && models+=("minilm-shape=$WORK/minilm-shape")
    fi
    : > "$OUT/bench.jsonl"
    for entry in "${models[@]}"; do
        name="${entry%%=*}"; dir="${entry#*=}"
        echo "## $name"
        # f16 storage (the default) at two batch sizes, and bf16 at the larger.
        for run in f16:16384 f16:65536 bf16:65536; do
            prec="${run%%:*}"; bt="${run#*:}"
            $T "$BIN/mira" bench --model "$dir" --input "$WORK/texts.jsonl" --device cuda --precision "$prec" \
                --max-tokens 512 --batch-tokens "$bt" --repeat 3 --json 2>"$OUT/mira-$name-$prec-$bt.err" \
                | sed "s/^{/{\"case\":\"$name\",\"engine\":\"mira cuda $prec, batches of $bt tokens\",/" \
                | tee -a "$OUT/bench.jsonl" || { status=1; tail -5 "$OUT/mira-$name-$prec-$bt.err"; }
        done
        if [ "$WGPU" = 1 ]; then
            $T "$BIN/mira" bench --model "$dir" --input "$WORK/texts.jsonl" --device wgpu --max-tokens 512 \
                --repeat 3 --json 2>"$OUT/mira-$name-wgpu.err" \
                | sed "s/^{/{\"case\":\"$name\",\"engine\":\"mira wgpu (Vulkan)\",/" \
                | tee -a "$OUT/bench.jsonl" || { status=1; tail -5 "$OUT/mira-$name-wgpu.err"; }
        fi
        # Small batches: one 128-token document per batch, op by op, then as CUDA graphs.
        for graphs in 0 128; do
            $T "$BIN/mira" bench --model "$dir" --device cuda --max-tokens 512 --length 128 --docs 2000 \
                --batch-tokens 128 --cuda-graphs "$graphs" --repeat 3 --json 2>"$OUT/mira-$name-graphs$graphs.err" \
                | sed "s/^{/{\"case\":\"$name, 1 doc of 128 tokens per batch\",\"engine\":\"mira cuda f16, graphs up to $graphs tokens\",/" \
                | tee -a "$OUT/bench.jsonl" || { status=1; tail -5 "$OUT/mira-$name-graphs$graphs.err"; }
        done
        for attn in eager sdpa; do
            $T python3 benches/gpu/hf_bench.py run "$dir" "$WORK/texts.jsonl" --attn "$attn" --batch "${HF_BATCH:-128}" \
                2>"$OUT/hf-$name-$attn.err" \
                | sed "s/^{/{\"case\":\"$name\",/" | tee -a "$OUT/bench.jsonl" \
                || { status=1; tail -5 "$OUT/hf-$name-$attn.err"; }
        done
    done
    python3 - "$OUT/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
PEAK = 989e12  # H100/H200 SXM dense bf16
print("\n| case | engine | tokens/s | docs/s | MFU | batch p50 / p99 ms | vs transformers eager | vs sdpa |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for case in dict.fromkeys(r["case"] for r in rows):
    rs = [r for r in rows if r["case"] == case]
    flops = next((r["model_flops_per_token"] for r in rs if "model_flops_per_token" in r), None)
    base = {a: next((r["tokens_per_s"] for r in rs if a in r["engine"] and "transformers" in r["engine"]), None)
            for a in ("eager", "sdpa")}
    for r in rs:
        mfu = f"{100 * r['tokens_per_s'] * flops / PEAK:.1f}%" if flops else "-"
        ratio = lambda b: f"{r['tokens_per_s'] / b:.2f}x" if b else "-"
        lat = f"{r['batch_p50_ms']:.2f} / {r['batch_p99_ms']:.2f}" if "batch_p50_ms" in r else "-"
        g = r.get("cuda_graphs") or {}
        engine = r["engine"] + (f" ({g['recorded']} recorded, {g['replayed']} replays, {g['direct']} op by op)"
                                if g.get("recorded") or g.get("replayed") else "")
        print(f"| {case} | {engine} | {r['tokens_per_s']:,.0f} | {r['docs_per_s']:,.0f} | {mfu} | {lat} | "
              f"{ratio(base['eager'])} | {ratio(base['sdpa'])} |")
PY
fi
[ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
exit $status
