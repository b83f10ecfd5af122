#!/usr/bin/env bash
# The distillation measurement of docs/TRAINING.md ("Distillation: the measurement"), from the
# repository root, on CPU or one GPU (about 2 hours on a shared 2-core VM):
#   OUT=/tmp/kd launch/distill_demo.sh
#
# The demo corpus (Python's docstrings) as prepared shards; a wider teacher (dim 256 instead of the
# debug model's 128) trained on it for 500 steps; then the debug model as student, 300 steps from
# the same initial weights (seed 0) four ways: cross-entropy only, online distillation over the full
# vocabulary (alpha 0.5), online from the teacher's top-16 and the same from its cached top-16;
# last, each student's held-out KL to the teacher over the demo's val/ and the largest difference
# between the online and cached top-16 runs' losses.
# Every stage that finished is skipped on a rerun. Tunable (environment): OUT, PY (python3),
# TEACHER_STEPS (500), STUDENT_STEPS (300), ALPHA (0.5), TOP_K (16).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${ROOT}"
OUT=${OUT:-/tmp/distill_demo}
PY=${PY:-python3}
TEACHER_STEPS=${TEACHER_STEPS:-500}
STUDENT_STEPS=${STUDENT_STEPS:-300}
ALPHA=${ALPHA:-0.5}
TOP_K=${TOP_K:-16}
mkdir -p "${OUT}"

if [ ! -f "${OUT}/demo_src/DONE.json" ]; then
    ${PY} -m mobilellm_train.data.demo "${OUT}/demo_src" 2000
fi
if [ ! -f "${OUT}/demo/manifest.json" ]; then
    ${PY} -m mobilellm_train.data.prepare convert --layout nodes --input "${OUT}/demo_src/data" --out "${OUT}/demo" \
        --tokenizer "${OUT}/demo_src/tokenizer.model" --unit-bytes 1M --workers 1
fi
if [ ! -f "${OUT}/demo/val/manifest.json" ]; then
    ${PY} -m mobilellm_train.data.prepare convert --layout nodes --input "${OUT}/demo_src/val" --out "${OUT}/demo/val" \
        --tokenizer "${OUT}/demo_src/tokenizer.model" --workers 1
fi

COMMON=(--config train_configs/debug.toml --data.path "${OUT}/demo" --data.val_path "${OUT}/demo/val"
        --data.val_interval 100 --metrics.enable_tensorboard false)
TEACHER="${OUT}/teacher/checkpoints/step-${TEACHER_STEPS}"
if [ ! -d "${TEACHER}" ]; then
    ${PY} -m mobilellm_train.train "${COMMON[@]}" --job.dump_folder "${OUT}/teacher" --model.dim 256 \
        --model.ffn_dim 768 --training.steps "${TEACHER_STEPS}" --checkpoint.interval "${TEACHER_STEPS}"
fi

STUDENT=("${COMMON[@]}" --training.steps "${STUDENT_STEPS}" --checkpoint.interval "${STUDENT_STEPS}")
DISTILL=(--distill.alpha "${ALPHA}" --distill.top_k "${TOP_K}")
student() {  # name, extra arguments
    local name=$1
    shift
    if [ ! -d "${OUT}/${name}/checkpoints/step-${STUDENT_STEPS}" ]; then
        ${PY} -m mobilellm_train.train "${STUDENT[@]}" --job.dump_folder "${OUT}/${name}" "$@"
    fi
}
student ce
student full --distill.alpha "${ALPHA}" --distill.teacher "${TEACHER}"
student online "${DISTILL[@]}" --distill.teacher "${TEACHER}"
if [ ! -f "${OUT}/demo-top${TOP_K}/manifest.json" ]; then
    ${PY} -m mobilellm_train.data.prepare teacher-logits --teacher "${TEACHER}" --data "${OUT}/demo" \
        --out "${OUT}/demo-top${TOP_K}" --top-k "${TOP_K}" --seq-len 256
fi
student cached "${DISTILL[@]}" --distill.logits "${OUT}/demo-top${TOP_K}"

for name in ce full online cached; do
    ${PY} -m mobilellm_train.distill.heldout --teacher "${TEACHER}" --student "${OUT}/${name}/checkpoints/step-${STUDENT_STEPS}" \
        --data "${OUT}/demo/val" --seq-len 256 > "${OUT}/heldout_${name}.json"
done
${PY} - "${OUT}" <<'EOF'
import json, sys
out = sys.argv[1]
kl = {name: json.load(open(f"{out}/heldout_{name}.json")) for name in ("ce", "full", "online", "cached")}
for name, r in kl.items():
    print(f"{name:7s} held-out KL to the teacher {r['kl']:.4f} nats/token, CE {r['student_ce']:.4f} "
          f"(teacher's CE {r['teacher_ce']:.4f}, {r['tokens']} tokens)")
for name in ("full", "online", "cached"):
    print(f"{name}: KL {kl[name]['kl'] / kl['ce']['kl']:.1%} of the CE-only run's")
metrics = {name: [json.loads(line) for line in open(f"{out}/{name}/metrics.jsonl")] for name in ("online", "cached")}
steps = {name: {r["step"]: r for r in records} for name, records in metrics.items()}
for key in ("loss", "ce", "kd", "val_loss", "val_kd"):
    pairs = [(a[key], steps["cached"][s][key]) for s, a in steps["online"].items() if key in a]
    worst = max(abs(x - y) / abs(x) for x, y in pairs)
    print(f"online vs cached {key}: {len(pairs)} records, largest relative difference {worst:.2e}")
EOF
