#!/usr/bin/env bash
# The GPU check, sized for one call of at most 8 minutes on one H100/H200 (docs/PERFORMANCE.md has
# the exact command, including the torchdata wheel for a machine without network):
#   OUT=bench_results launch/gpu_bench.sh        # from the repository root
#
# 1. smoke: one compiled training step of every preset TOML, its peak memory against the
#    planner's (mobilellm-plan) and the SDPA kernel it ran, one process per preset, two lanes
#    side by side (compiling is CPU-bound; the lanes' presets fit the card together);
# 2. timed: our trainer against the original-style HF Llama, in the order 125M, 1B, 350M, 1.5B,
#    600M, 125M_ls (1B and 1.5B at their presets' micro-batch 8 without AC): tokens/s, MFU, memory,
#    speed-up;
# 3. with the time left: the tests marked gpu, then the whole trainer on 125M (gpu_check.py).
# After every preset a row is appended to ${OUT}/summary.md and ${OUT}/all_results.tar.gz is
# rebuilt from everything else, so a run killed at any point keeps what finished; those are the
# only two files in ${OUT}. Every preset and stage runs under its own timeout within BUDGET_S.
# Intermediate files live in a fresh mktemp -d folder (WORK), removed at the end unless KEEP_WORK=1.
#
# Tunable (environment): BUDGET_S (420), SMOKE_BUDGET_S (190), SMOKE_PRESETS, TIMED_PRESETS,
# SMOKE_PRESET_S (75), TIMED_PRESET_S (100), BENCH_ARGS (extra arguments for every bench call),
# TIMED_ARGS ("--steps 5 --warmup-steps 2"), GPU_TESTS (1), GPU_CHECK (1), ALLOW_CPU (0).
# A dry run of the whole flow on CPU, with tiny shapes:
#   ALLOW_CPU=1 SMOKE_PRESETS=debug TIMED_PRESETS=debug BENCH_ARGS="--seq-len 32 --local-batch-size 2 \
#     --baseline-batch-size 2" GPU_TESTS=0 GPU_CHECK=0 OUT=$(mktemp -d) launch/gpu_bench.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${ROOT}"
OUT=${OUT:-bench_results}
mkdir -p "${OUT}"
OUT=$(cd "${OUT}" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")
BUDGET_S=${BUDGET_S:-420}
SMOKE_BUDGET_S=${SMOKE_BUDGET_S:-190}
SMOKE_PRESETS=${SMOKE_PRESETS:-"125M 1B 350M 125M_ls 350M_ls|1.5B 600M"}
TIMED_PRESETS=${TIMED_PRESETS:-"125M 1B 350M 1.5B 600M 125M_ls"}
SMOKE_PRESET_S=${SMOKE_PRESET_S:-75}
TIMED_PRESET_S=${TIMED_PRESET_S:-100}
BENCH_ARGS=${BENCH_ARGS:-""}
TIMED_ARGS=${TIMED_ARGS:-"--steps 5 --warmup-steps 2"}
GPU_TESTS=${GPU_TESTS:-1}
GPU_CHECK=${GPU_CHECK:-1}
PY=${PY:-python3}
SUMMARY=${OUT}/summary.md

cleanup() { [ "${KEEP_WORK:-0}" = 1 ] || rm -rf "${WORK}"; }
trap cleanup EXIT

# Wheels carried in .whl/ (torchdata on a machine without network) go into WORK; the checkout
# comes first on PYTHONPATH so that nothing installed can shadow the code under test.
if compgen -G ".whl/*.whl" > /dev/null; then
    # A pure-Python wheel is a zip: without pip, unpacking it is the same install.
    ${PY} -m pip install -q --no-index --no-deps --target "${WORK}/site" .whl/*.whl 2>&1 | tail -3
    [ "${PIPESTATUS[0]}" -eq 0 ] || ${PY} -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "${WORK}/site" .whl/*.whl
    export PYTHONPATH=${ROOT}:${WORK}/site${PYTHONPATH:+:${PYTHONPATH}}
else
    export PYTHONPATH=${ROOT}${PYTHONPATH:+:${PYTHONPATH}}
fi
# One compile cache for every process: the timed stage reuses the graphs the smoke stage compiled.
export TORCHINDUCTOR_CACHE_DIR=${WORK}/inductor_cache

{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
    ${PY} -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())"
    ${PY} -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1
    ${PY} -c "import torchdata; print('torchdata', torchdata.__version__)" 2>&1 | tail -1
    echo '```'
} > "${SUMMARY}" 2>&1
cat "${SUMMARY}"

if [ "${ALLOW_CPU:-0}" != 1 ] && ! ${PY} -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_bench: no CUDA device (ALLOW_CPU=1 for a dry run)" | tee -a "${SUMMARY}" >&2
    exit 1
fi

# Everything but the summary, as one archive, replaced atomically (a kill mid-tar keeps the last).
# The part file is named per process: smoke lanes may archive at the same time.
archive() {
    local part=${OUT}/.all_results.${BASHPID}.part
    tar czf "${part}" -C "${WORK}" --exclude inductor_cache --exclude site --exclude synthetic_tokens . 2> /dev/null \
        && mv "${part}" "${OUT}/all_results.tar.gz" || rm -f "${part}"
}

# run NAME LIMIT_S COMMAND...: COMMAND under a timeout of min(LIMIT_S, budget left), its output
# to the console and ${WORK}/logs/NAME.log. Returns 1 without running when under 20 s are left.
run() {
    local name=$1 limit_s=$2
    shift 2
    local left=$((BUDGET_S - SECONDS))
    [ "${left}" -lt "${limit_s}" ] && limit_s=${left}
    if [ "${limit_s}" -lt 20 ]; then
        echo "- ${name}: skipped, ${left} s of the budget left" >> "${SUMMARY}"
        return 1
    fi
    mkdir -p "${WORK}/logs"
    echo "== ${name} (at most ${limit_s} s)"
    timeout --signal=TERM --kill-after=10 "${limit_s}" "$@" 2>&1 | tee "${WORK}/logs/${name}.log"
    local rc=${PIPESTATUS[0]}
    if [ "${rc}" -ne 0 ]; then
        local why="exit ${rc}"
        [ "${rc}" -eq 124 ] || [ "${rc}" -eq 137 ] && why="timed out after ${limit_s} s"
        echo "- ${name}: ${why}; last lines: \`$(tail -3 "${WORK}/logs/${name}.log" | tr '\n`|' '  /' | cut -c1-300)\`" \
            >> "${SUMMARY}"
    fi
    return 0
}

# 1. Smoke: one compiled step per preset, memory against the planner. Compiling is CPU work, so
# the presets run in lanes ("|" separates them in SMOKE_PRESETS), one process at a time per lane;
# the default lanes keep any two presets that may overlap under the card's memory by the planner
# (1.5B and 600M, the two largest, share a lane).
{ echo; echo "## 1. Smoke: one compiled step per preset (measured peak vs planner; lanes: ${SMOKE_PRESETS})"; echo; } \
    >> "${SUMMARY}"
SMOKE_END=$((SECONDS + SMOKE_BUDGET_S))
smoke_lane() {
    # bash starts background jobs with SIGINT ignored; a Python that inherits that (torch's profiler
    # and process group at exit) was seen spinning in garbage collection instead of exiting.
    trap - INT QUIT
    local preset limit
    for preset in "$@"; do
        limit=$((SMOKE_END - SECONDS))
        [ "${limit}" -gt "${SMOKE_PRESET_S}" ] && limit=${SMOKE_PRESET_S}
        # shellcheck disable=SC2086
        run "smoke_${preset}" "${limit}" ${PY} -m mobilellm_train.bench --presets "${preset}" --steps 1 \
            --warmup-steps 1 --no-baseline --no-oom-retry ${BENCH_ARGS} --out "${WORK}/smoke" --name "${preset}" \
            || continue
        [ -f "${WORK}/smoke/${preset}.json" ] && ${PY} launch/gpu_summary.py smoke "${WORK}/smoke/${preset}.json" >> "${SUMMARY}" 2>&1
        archive
    done
}
IFS='|' read -ra LANES <<< "${SMOKE_PRESETS}"
for lane in "${LANES[@]}"; do
    # shellcheck disable=SC2086
    smoke_lane ${lane} &
done
wait

# 2. Timed: ours against the original-style baseline, most wanted first.
{ echo; echo "## 2. Timed: ours vs the original-style HF Llama"; echo; } >> "${SUMMARY}"
for preset in ${TIMED_PRESETS}; do
    # shellcheck disable=SC2086
    run "timed_${preset}" "${TIMED_PRESET_S}" ${PY} -m mobilellm_train.bench --presets "${preset}" ${TIMED_ARGS} \
        ${BENCH_ARGS} --out "${WORK}/timed" --name "${preset}" || continue
    [ -f "${WORK}/timed/${preset}.json" ] && ${PY} launch/gpu_summary.py timed "${WORK}/timed/${preset}.json" >> "${SUMMARY}" 2>&1
    archive
done

# 3. With the time left: the GPU tests, then the whole trainer (data loader, logging) on 125M.
if [ "${GPU_TESTS}" = 1 ]; then
    { echo; echo "## 3. Tests marked gpu"; echo; } >> "${SUMMARY}"
    if run gpu_tests 150 ${PY} -m pytest -q -m gpu tests -p no:cacheprovider -x; then
        echo "\`$(tail -1 "${WORK}/logs/gpu_tests.log")\`" >> "${SUMMARY}"
    fi
    archive
fi
if [ "${GPU_CHECK}" = 1 ]; then
    { echo; echo "## 4. The whole trainer, 125M"; echo; } >> "${SUMMARY}"
    if run gpu_check 120 ${PY} launch/gpu_check.py --presets 125M --steps 20 --warmup-steps 10 --out "${WORK}/gpu_check"; then
        [ -f "${WORK}/gpu_check/gpu_check.json" ] \
            && ${PY} launch/gpu_summary.py check "${WORK}/gpu_check/gpu_check.json" >> "${SUMMARY}" 2>&1
    fi
    archive
fi

echo >> "${SUMMARY}"
echo "Done in ${SECONDS} s of a ${BUDGET_S} s budget." >> "${SUMMARY}"
archive
echo "gpu_bench: done in ${SECONDS}s; see ${SUMMARY} (everything else in ${OUT}/all_results.tar.gz)"
