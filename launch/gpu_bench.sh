#!/usr/bin/env bash
# The one GPU script: everything the CPU could not measure, in about 9 minutes on one H100/H200.
#   OUT=bench_results launch/gpu_bench.sh            # from the repository root
#   WORK=/tmp/gpu_work OUT=$OUT launch/gpu_bench.sh  # only summary.md and all_results.tar.gz in OUT
#
# 1. installs the wheels of a .whl/ folder when there is one (a machine without internet),
# 2. benchmarks every preset TOML (LS variants included) against the original-style HF Llama,
#    the same run, seq 2048: tokens/s per GPU, MFU, peak memory, step time, speed-up, compile health,
# 3. times the lm-head loss alone: plain fp32 logits vs chunked_cross_entropy (eager, compiled),
# 4. runs the tests marked gpu (no graph breaks or recompiles, flash/cuDNN attention),
# 5. with the time left, the sweeps behind the presets' choices: AC mode and micro-batch for
#    1B and 1.5B, compile off and reshard_after_forward for 125M.
# The most valuable results come first; every stage is bounded by the time left (BUDGET_S, default
# 540 s) and writes its JSON/markdown as it goes, so a cut-off run still leaves its figures. Results:
# ${OUT}/bench.{json,md}, loss_bench.{json,md}, sweep_*.{json,md}, gpu_tests.txt, env.txt, summary.md.
#
# A dry run on CPU with tiny shapes checks the script itself:
#   ALLOW_CPU=1 BENCH_PRESETS=debug BENCH_ARGS="--steps 2 --warmup-steps 1 --seq-len 64 --local-batch-size 2" \
#   LOSS_PRESETS=debug LOSS_ARGS="--seq-len 64 --local-batch-size 2" SWEEPS=0 CKPT_FLAVORS=debug GPU_CHECK=0 \
#   OUT=/tmp/gpu_bench_dry launch/gpu_bench.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${ROOT}"
OUT=${OUT:-bench_results}
# WORK holds every intermediate file; OUT receives summary.md and all_results.tar.gz at the end
# (set WORK elsewhere when OUT must stay small). By default they are the same folder.
FINAL_OUT=${OUT}
OUT=${WORK:-${OUT}}
mkdir -p "${OUT}" "${FINAL_OUT}"
BUDGET_S=${BUDGET_S:-540}
BENCH_PRESETS=${BENCH_PRESETS:-"125M 1B 350M 600M 1.5B 125M_ls 350M_ls"}
BENCH_ARGS=${BENCH_ARGS:-"--steps 8 --warmup-steps 3"}
LOSS_PRESETS=${LOSS_PRESETS:-"125M 1.5B"}
LOSS_ARGS=${LOSS_ARGS:-""}
SWEEPS=${SWEEPS:-1}
CKPT_FLAVORS=${CKPT_FLAVORS:-"125M 1.5B"}
GPU_CHECK=${GPU_CHECK:-1}
PY=python3

if [ -d .whl ] && compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing carried wheels from .whl/"
    ${PY} -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${ROOT}
else
    export PYTHONPATH=${ROOT}${PYTHONPATH:+:${PYTHONPATH}}
fi

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    nvidia-smi 2>&1 | head -20
    ${PY} -c "import torch, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    ${PY} -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
} > "${OUT}/env.txt" 2>&1
cat "${OUT}/env.txt"

if [ "${ALLOW_CPU:-0}" != 1 ] && ! ${PY} -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no CUDA device (ALLOW_CPU=1 for a dry run)" >&2
    exit 1
fi

# stage NAME MIN_SECONDS RESERVE_SECONDS COMMAND...: run COMMAND if at least MIN_SECONDS of the
# budget are left, killed when only RESERVE_SECONDS (kept for the later stages) remain; its output
# goes to the console and ${OUT}/NAME.log.
stage() {
    local name=$1 min_s=$2 reserve_s=$3
    shift 3
    local left=$((BUDGET_S - SECONDS - reserve_s))
    if [ "${left}" -lt "${min_s}" ]; then
        echo "== ${name}: skipped, ${left}s of the budget left for it (needs ${min_s}s)" | tee -a "${OUT}/skipped.txt"
        return 0
    fi
    echo "== ${name} (${left}s for it)"
    timeout --signal=TERM --kill-after=10 "${left}" "$@" 2>&1 | tee "${OUT}/${name}.log"
    local rc=${PIPESTATUS[0]}
    [ "${rc}" -eq 0 ] || echo "== ${name}: exit code ${rc}" | tee -a "${OUT}/failed.txt"
}

# 2. Every preset, ours and the original-style baseline in the same process.
# shellcheck disable=SC2086
# The loss comparison and the GPU tests keep 150 s; the bench writes its JSON after each preset,
# so a bench cut short still leaves the presets it finished.
stage bench 120 150 ${PY} -m mobilellm_train.bench --presets ${BENCH_PRESETS} ${BENCH_ARGS} --out "${OUT}" --name bench

# 3. The loss alone, at the presets' micro-batch x 2048.
# shellcheck disable=SC2086
stage loss_bench 45 100 ${PY} -m mobilellm_train.bench --loss --presets ${LOSS_PRESETS} --chunk-sizes 2048 4096 8192 \
    --loss-iters 5 ${LOSS_ARGS} --out "${OUT}" --name loss_bench

# 4. The GPU tests.
if ${PY} -c "import pytest" 2> /dev/null; then
    stage gpu_tests 60 0 ${PY} -m pytest -q -m gpu tests -p no:cacheprovider
else
    echo "== gpu_tests: skipped, pytest is not installed" | tee -a "${OUT}/skipped.txt"
fi

# 5. How long a checkpoint save blocks training, per async mode (the fault-tolerance figures).
# shellcheck disable=SC2086
stage checkpoint_bench 60 0 ${PY} -m mobilellm_train.checkpoint_bench --flavor ${CKPT_FLAVORS} --repeats 2 \
    --out "${OUT}/checkpoint_bench.json"

# 6. Sweeps, most informative first. Each is its own process (a fresh compile cache).
if [ "${SWEEPS}" = 1 ]; then
    stage sweep_1B_ac 90 0 ${PY} -m mobilellm_train.bench --presets 1B --no-baseline --steps 6 --warmup-steps 3 \
        --activation_checkpoint.mode selective --out "${OUT}" --name sweep_1B_selective
    stage sweep_125M_nocompile 45 0 ${PY} -m mobilellm_train.bench --presets 125M --no-baseline --steps 6 \
        --warmup-steps 2 --compile.enable false --out "${OUT}" --name sweep_125M_nocompile
    stage sweep_1B_batch 90 0 ${PY} -m mobilellm_train.bench --presets 1B --no-baseline --steps 6 --warmup-steps 3 \
        --activation_checkpoint.mode none --local-batch-size 8 --out "${OUT}" --name sweep_1B_noac_batch8
    stage sweep_1.5B_ac 90 0 ${PY} -m mobilellm_train.bench --presets 1.5B --no-baseline --steps 6 --warmup-steps 3 \
        --activation_checkpoint.mode selective --local-batch-size 8 --out "${OUT}" --name sweep_1.5B_selective_batch8
    stage sweep_600M_reshard 60 0 ${PY} -m mobilellm_train.bench --presets 600M --no-baseline --steps 6 \
        --warmup-steps 3 --parallelism.reshard_after_forward false --out "${OUT}" --name sweep_600M_noreshard
fi

# 7. The whole trainer (data loader, logging, metrics.jsonl) on the 125M and 1B presets, if time is left.
[ "${GPU_CHECK}" = 1 ] && stage gpu_check 150 0 ${PY} launch/gpu_check.py --presets 125M 1B --steps 30 --out "${OUT}/gpu_check"

{
    echo "# GPU bench $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    cat "${OUT}/env.txt"
    echo '```'
    for f in "${OUT}"/bench.md "${OUT}"/loss_bench.md "${OUT}"/sweep_*.md; do
        [ -f "${f}" ] || continue
        echo
        echo "## $(basename "${f}" .md)"
        echo
        cat "${f}"
    done
    for f in "${OUT}"/checkpoint_bench.json "${OUT}"/gpu_check/gpu_check.json; do
        [ -f "${f}" ] && { echo; echo "## $(basename "${f}")"; echo; echo '```'; cat "${f}"; echo '```'; }
    done
    if [ -f "${OUT}/gpu_tests.log" ]; then
        echo
        echo "## gpu tests"
        echo
        echo '```'
        tail -5 "${OUT}/gpu_tests.log"
        echo '```'
    fi
    for f in skipped failed; do
        [ -f "${OUT}/${f}.txt" ] && { echo; echo "## ${f}"; echo; cat "${OUT}/${f}.txt"; }
    done
} > "${OUT}/summary.md"
# A machine that sends back only a few files: everything else travels as one archive.
tar czf /tmp/gpu_bench_results.tar.gz -C "${OUT}" --exclude synthetic_tokens --exclude all_results.tar.gz . \
    && mv /tmp/gpu_bench_results.tar.gz "${FINAL_OUT}/all_results.tar.gz"
[ "${FINAL_OUT}" = "${OUT}" ] || cp "${OUT}/summary.md" "${FINAL_OUT}/summary.md"
echo "gpu_bench: done in ${SECONDS}s; see ${FINAL_OUT}/summary.md (everything in ${FINAL_OUT}/all_results.tar.gz)"
