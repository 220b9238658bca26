#!/usr/bin/env bash
# Issue 12 device check: `mrisegassist bench prompt` in every variant needed to decide what to keep on a GPU.
#
#   on a lent GPU (from the project root, after ../shared/tools/gpu-bundle.sh built .gpu/):
#       bash .gpu/run.sh bash scripts/gpu_check.sh          (device tool: carry [".gpu"], timeout_s 420)
#   rehearsal on the CPU (same steps, tiny sizes: 3 slices, 256 px; timings meaningless, plumbing checked):
#       GPU_CHECK_TINY=1 OUT=/tmp/gpu-check bash scripts/gpu_check.sh
#
# Writes to $OUT (at most 8 files come back): log.txt (nvidia-smi, versions, every command and its stderr),
# one JSON per part as soon as it finishes (p512.json, sam.json, p1024.json, compile.json, vos.json; a part
# cut by its time limit leaves no JSON, the earlier ones stay) and summary.txt (every goal met / NOT met).
# Parts, most important first, each under its own time limit; GPU_CHECK_PARTS selects some (e.g. for a rerun:
# GPU_CHECK_PARTS="p1024 vos"); GPU_CHECK_BUDGET (seconds, default 330): every part ends by then (a part that
# would start with less than a third of its limit left is skipped), so the whole call stays under ~360 s on a
# warm machine plus the bundle's ~15 s unpack.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/log.txt
PY=${PYTHON:-python3}
DATA=${GPU_CHECK_DATA:-.gpu/data}
PARTS=${GPU_CHECK_PARTS:-"p512 sam p1024 compile vos"}
T0=$(date +%s)
if [ -n "${GPU_CHECK_TINY:-}" ]; then
    # CPU: torch.compile disabled (TORCHDYNAMO_DISABLE) in the compile and VOS parts: they check the plumbing
    # (the compiled step itself is checked on the CPU by Testing/test_sam2_engine.py::test_compiled_step...)
    DEV=cpu; FRAMES="--frames ${GPU_CHECK_FRAMES:-3}"; S512=256; S1024=256; SAMN=2; SCALE=20
    [ -d "$DATA" ] || DATA=${MRISEGASSIST_DATA:-../shared/data}
else
    DEV=cuda; FRAMES=""; S512=512; S1024=1024; SAMN=16; SCALE=1
fi
BUDGET=${GPU_CHECK_BUDGET:-$(( 330 * SCALE ))}
# variants: lean loop exact shapes eager vs fixed shapes + CUDA graphs, fp32 and bf16 (auto = bf16 + graphs)
V_MAIN="precision=fp32,shapes=exact,graphs=off;precision=fp32;precision=bf16,shapes=exact,graphs=off;auto"
V_1024="precision=fp32;precision=bf16,shapes=exact,graphs=off;auto"
V_COMPILE="precision=bf16,compile=default"

{
    echo "== gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC') parts: $PARTS tiny: ${GPU_CHECK_TINY:-no}"
    nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    $PY -c "import sam2, segment_anything, mrisegassist; print('sam2', getattr(sam2, '__version__', '1.1.0'), 'mrisegassist', mrisegassist.__file__)"
    nproc; free -g 2>/dev/null | head -2
} >"$LOG" 2>&1

part() {  # part NAME LIMIT_S ARGS...
    local name=$1 limit=$2; shift 2
    case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
    local now; now=$(( $(date +%s) - T0 ))
    limit=$(( limit * SCALE ))
    if [ $(( now + limit / 3 )) -gt "$BUDGET" ]; then
        echo "== $name skipped: ${now} s used of the ${BUDGET} s budget" >>"$LOG"; return 0
    fi
    # never past the budget: a part started late gets what is left (at least a third of its limit)
    [ $(( now + limit )) -le "$BUDGET" ] || limit=$(( BUDGET - now ))
    local cmd=($PY -m mrisegassist bench prompt --device "$DEV" --json --data "$DATA" $FRAMES "$@")
    echo "== $name (limit ${limit} s, started at ${now} s): ${cmd[*]}" >>"$LOG"
    local t=$(date +%s)
    timeout --kill-after=5 "$limit" "${cmd[@]}" >"$OUT/$name.json.part" 2>>"$LOG"
    local rc=$?
    echo "== $name rc=$rc in $(( $(date +%s) - t )) s" >>"$LOG"
    if [ $rc -eq 0 ]; then mv "$OUT/$name.json.part" "$OUT/$name.json"; else rm -f "$OUT/$name.json.part"; fi
}

# 1. MedSAM2 configuration (512 px): every lean-loop variant, official fp32 and bf16 references
part p512 120 --size "$S512" --variants "$V_MAIN" --reference-bf16 --sam-slices 0
# 2. SAM ViT-B: SamPredictor one slice at a time vs our batched encoding (bf16 auto and fp32)
part sam 60 --size 0 --sam-slices "$SAMN" --sam-variants "auto;precision=fp32"
# 3. SAM 2.1 hiera-tiny at 1024 px
part p1024 120 --size "$S1024" --variants "$V_1024" --reference-bf16 --sam-slices 0
NODYNAMO=${GPU_CHECK_TINY:+env TORCHDYNAMO_DISABLE=1}
# 4. torch.compile (inductor, default mode) of our tracking step, replayed as a CUDA graph
PY="$NODYNAMO $PY" part compile 110 --size "$S512" --variants "$V_COMPILE" --sam-slices 0
# 5. sam2's own compiled route: SAM2VideoPredictorVOS (max-autotune) beside the fp32 reference
PY="$NODYNAMO $PY" part vos 110 --size "$S512" --variants "" --vos --sam-slices 0

$PY - "$OUT" >"$OUT/summary.txt" 2>>"$LOG" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("p512", "sam", "p1024", "compile", "vos"):
    path = out / f"{name}.json"
    if not path.is_file():
        print(f"== {name}: no result (skipped, failed or cut by its time limit: see log.txt)")
        continue
    try:
        s = json.loads(path.read_text())
    except ValueError as exc:
        print(f"== {name}: unreadable JSON ({exc}): see {name}.json")
        continue
    print(f"== {name}: {s['model']} on {s['device_name']}; {s['torch']}; {s['date']}")
    for r in s["references"]:
        print(f"   {r['label']:<40} {r['seconds']:8.3f} s {r['slices']:4d} slices {r['per_slice_s'] * 1000:8.2f} ms/slice"
              f"  Dice vs fp32 ref {r['dice_in_z_range'] if r['dice_in_z_range'] is not None else '-'}")
    if s.get("reference_note"):
        print(f"   {s['reference_note']}")
    for f in s.get("failed", []):
        print(f"   variant {f}")
    for v in s["variants"]:
        print(f"   ours [{v['spec']}] {v['description']}; warm-up {v['warmup_s']:.2f} s")
        for r in v["runs"]:
            print(f"      {r['label']:<20} {r['seconds']:8.3f} s {r['slices']:4d} slices {r['per_slice_s'] * 1000:8.2f} ms/slice"
                  f" encoded {r['encoded']:4d} Dice {r['dice_in_z_range']} (bf16 ref {r['dice_vs_bf16_reference']})")
        for g in v["goals"]:
            print(f"      goal {g['name']}: {g['value']} (target {g['target']}) {'met' if g['met'] else 'NOT met'}")
    for r in s.get("sam_vit_b", []):
        print(f"   SAM {r['label']:<58} encode {r['encode_s'] * 1000:8.2f} ms/slice decode {r['decode_s'] * 1000:7.2f} ms"
              f" encoded {r['encoded']} Dice vs SamPredictor {r['dice_vs_reference']}")
PYEOF
echo "== done in $(( $(date +%s) - T0 )) s" >>"$LOG"
cat "$OUT/summary.txt"
