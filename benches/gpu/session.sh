#!/usr/bin/env bash
# One metered device call for the GPU issue: everything benches/gpu/run.sh does (CUDA checks, wgpu
# on Vulkan, the BERT-base and MiniLM benchmark tables), then the ModernBERT-base shape at 512 and
# 8,192 tokens, then an Nsight Compute profile of BERT-base batches (time per kernel, and how close
# each kernel runs to the SM and memory ceilings). The device tool returns at most 8 files, so the
# logs travel as one archive that is rewritten every 15 s and after every step (a call killed at
# its limit still returns what ran):
#   $OUT/logs.tgz      every log;  $OUT/bench.jsonl  one JSON line per benchmark;
#   $OUT/summary.json  steps (exit status, seconds), test counts, ModernBERT rows, top kernels;
#   $OUT/summary.md    the tables, also printed last.
# usage (repo root of the GPU machine, bundle from scripts/gpu_bundle.sh carried: .gpu/bin and
# .gpu/minilm, or both as .gpu/pack.tar.xz (`scripts/gpu_bundle.sh --pack`), and .gl):
#   OUT=$OUT benches/gpu/session.sh
# env: STEP_S (per run.sh command, default 150), DOCS (20000), MODERNBERT ("512 8192": the lengths
#      to run), PROFILE (ncu's selection, default "--launch-count 600"; "-k regex:attention
#      --launch-count 24" for some kernels only; "off" for no profile)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export OUT="${OUT:-/tmp/mira-gpu-session}" PYTHONUNBUFFERED=1
LOGS=/tmp/mira-gpu-logs
rm -rf "$LOGS" && mkdir -p "$LOGS/run" "$OUT"
if [ -f .gpu/pack.tar.xz ] && [ ! -x .gpu/bin/mira ]; then  # the bundle, packed to fit one transfer
    python3 -c 'import tarfile; tarfile.open(".gpu/pack.tar.xz").extractall(".gpu")'
fi
BIN=.gpu/bin
save() {  # each writer its own temporary name; the rename is atomic
    local part="$OUT/.logs.$BASHPID.part"
    tar -czf "$part" -C "$LOGS" . 2>/dev/null && mv "$part" "$OUT/logs.tgz"
}
# Also every 15 s, so a call killed in the middle of a step still returns that step's logs.
(while sleep 15; do save; done) >/dev/null 2>&1 &
SAVER=$!
stop_saver() { kill "$SAVER" 2>/dev/null; wait "$SAVER" 2>/dev/null; }
trap stop_saver EXIT
step() {  # step NAME LIMIT_S COMMAND...: run, log, record exit status and seconds
    local name=$1 limit=$2 s rc
    shift 2
    s=$(date +%s)
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    printf '{"step":"%s","rc":%d,"seconds":%d}\n' "$name" "$rc" "$(($(date +%s) - s))" >>"$LOGS/steps.jsonl"
    echo "## $name: exit $rc after $(($(date +%s) - s)) s"
    save
    return 0
}

{
    date -u +%Y-%m-%dT%H:%M:%SZ
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
    python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
    (command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu) 2>&1 | head -1
    nvcc --version 2>&1 | tail -1
} >"$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

# 1. correctness, then 2. the benchmark tables (run.sh's own halves, so each has its own limit)
step checks 330 env OUT="$LOGS/run" SKIP_BENCH=1 benches/gpu/run.sh
WORK=/tmp/mira-gpu-work  # run.sh's models and texts, kept for the profile below
step bench 330 env OUT="$LOGS/run" SKIP_CHECKS=1 KEEP_WORK="$WORK" benches/gpu/run.sh
cp "$LOGS/run/bench.jsonl" "$OUT/bench.jsonl" 2>/dev/null

# 3. ModernBERT-base shape (22 layers, GeGLU, local attention 128 with a global layer every third)
MB=/tmp/modernbert-base
[ -n "${MODERNBERT-512 8192}" ] && step modernbert-make 120 python3 scripts/make_modernbert_base.py "$MB" --threads 16
for len in ${MODERNBERT-512 8192}; do
    bt=65536 docs=$((2560000 / len))
    step "modernbert-$len" 150 bash -o pipefail -c "'$BIN/mira' bench --model '$MB' --device cuda --max-tokens $len --length $len \
        --docs $docs --batch-tokens $bt --repeat 3 --json | sed 's/^{/{\"case\":\"modernbert-base shape, $len tokens\",\"engine\":\"mira cuda f16, batches of $bt tokens\",/'"
    grep -h '^{' "$LOGS/modernbert-$len.log" >>"$OUT/bench.jsonl"
done

# 4. where BERT-base time goes: every kernel of a few 64K-token batches under Nsight Compute
PROFILE="${PROFILE:---launch-count 600}"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
BB="$WORK/bert-base"  # made by run.sh's benchmark; made here only if that step did not get to it
[ -f "$BB/config.json" ] || python3 benches/gpu/hf_bench.py make-model "$BB" >/dev/null 2>&1
if [ -n "$NCU" ] && [ -d "$BB" ] && [ "$PROFILE" != off ]; then
    # shellcheck disable=SC2086
    step ncu 150 "$NCU" --clock-control none --csv --page raw $PROFILE \
        --metrics gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed \
        "$BIN/mira" bench --model "$BB" --device cuda --max-tokens 512 --docs 512 --batch-tokens 65536 --repeat 1
fi

python3 - "$LOGS" "$OUT" <<'PY' | tee "$OUT/summary.md"
import csv, glob, io, json, os, re, sys
logs, out = sys.argv[1], sys.argv[2]
summary = {"machine": open(f"{logs}/machine.txt").read().splitlines(),
           "steps": [json.loads(l) for l in open(f"{logs}/steps.jsonl")], "tests": {}}
for f in sorted(glob.glob(f"{logs}/run/*.log")):
    text = open(f).read()
    name = os.path.basename(f)[:-4]
    summary["tests"][name] = {"results": re.findall(r"test result: .*", text),
                              "failed": [n for block in re.findall(r"^failures:\n((?:    \S+\n)+)", text, re.M)
                                         for n in block.split()]}
rows = [json.loads(l) for l in open(f"{out}/bench.jsonl") if l.strip()] if os.path.exists(f"{out}/bench.jsonl") else []
kernels = {}
ncu_log = f"{logs}/ncu.log"
if os.path.exists(ncu_log):
    lines = [l for l in open(ncu_log) if l.startswith('"')]
    if lines:
        recs = list(csv.DictReader(io.StringIO("".join(lines))))[1:]  # second row holds units
        for r in recs:
            try:
                t = float(r["gpu__time_duration.sum"].replace(",", ""))
            except (KeyError, ValueError):
                continue
            k = kernels.setdefault(r.get("Kernel Name", "?")[:90], {"launches": 0, "ns": 0.0, "sm": 0.0, "mem": 0.0, "tensor": 0.0})
            k["launches"] += 1
            k["ns"] += t
            for key, m in (("sm", "sm__throughput.avg.pct_of_peak_sustained_elapsed"),
                           ("mem", "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed"),
                           ("tensor", "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_elapsed")):
                try:
                    k[key] += t * float(r[m].replace(",", ""))
                except (KeyError, ValueError):
                    pass
total = sum(k["ns"] for k in kernels.values()) or 1
top = sorted(kernels.items(), key=lambda kv: -kv[1]["ns"])[:15]
summary["kernels"] = [{"kernel": n, "launches": k["launches"], "share": round(k["ns"] / total, 4),
                       "sm_pct": round(k["sm"] / k["ns"], 1), "mem_pct": round(k["mem"] / k["ns"], 1),
                       "tensor_pct": round(k["tensor"] / k["ns"], 1)} for n, k in top]
summary["bench"] = rows
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
for s in summary["steps"]:
    print(f"step {s['step']}: exit {s['rc']}, {s['seconds']} s")
for n, t in summary["tests"].items():
    print(n, t["results"], "FAILED:", t["failed"][:20])
print("\n| case | engine | tokens/s | docs/s | TFLOP/s | p50 / p99 ms |\n| --- | --- | ---: | ---: | ---: | ---: |")
for r in rows:
    print(f"| {r.get('case')} | {r.get('engine')} | {r['tokens_per_s']:,.0f} | {r['docs_per_s']:,.0f} | "
          f"{r.get('tflops_per_s', 0):.1f} | {r.get('batch_p50_ms', 0):.2f} / {r.get('batch_p99_ms', 0):.2f} |")
print("\n| kernel | launches | time share | SM % | memory % | tensor % |\n| --- | ---: | ---: | ---: | ---: | ---: |")
for k in summary["kernels"]:
    print(f"| {k['kernel']} | {k['launches']} | {100 * k['share']:.1f}% | {k['sm_pct']} | {k['mem_pct']} | {k['tensor_pct']} |")
PY
grep '^|' "$LOGS/bench.log" 2>/dev/null | tee -a "$OUT/summary.md"  # run.sh's table, with the ratios
stop_saver
save
tail -40 "$LOGS/run/"*.log 2>/dev/null | grep -E "panicked|FAILED|error" | head -20
