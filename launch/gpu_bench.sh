#!/usr/bin/env bash
# The GPU check, in two commands of at most about 8 minutes each on one H100/H200 (the GPU host), from
# the repository root; docs/PERFORMANCE.md has the whole procedure:
#   launch/gpu_bench.sh fetch                    # where there is network: the torchdata wheel into .whl/
#   OUT=bench_results launch/gpu_bench.sh        # 1. the presets
#   OUT=test_results launch/gpu_bench.sh tests   # 2. the tests marked gpu, then the whole trainer on 125M
#
# 1. One process per preset (mobilellm-bench): it compiles once, then gives both the smoke figures
#    (measured peak against the planner's, SDPA kernel, compile seconds, recompiles, graph breaks)
#    and the timed ones (tokens/s, MFU, step time), then times the original-style HF Llama for the
#    speed-up. Presets run one after another (their baselines would not fit the card together), a
#    small, a large and an LS one first: 125M, 1B, 125M_ls, 350M, 1.5B, 600M, 350M_ls. Each gets at
#    most PRESET_S seconds, and none starts with under MIN_PRESET_S left of BUDGET_S.
# 2. `tests`: the tests marked gpu (at most TESTS_S), then the trainer itself (launch/gpu_check.py,
#    at most CHECK_S), within BUDGET_S. These need torchdata; the presets do not.
# After every preset (or stage) a row is appended to ${OUT}/summary.md and ${OUT}/all_results.tar.gz is
# rebuilt from everything else (logs, JSON), so a run killed at any point keeps what finished;
# those are the only two files in ${OUT}. Intermediate files live in a fresh mktemp -d folder (WORK),
# removed at the end unless KEEP_WORK=1.
#
# Tunable (environment): BUDGET_S (420), PRESETS, PRESET_S (240), MIN_PRESET_S (60), TIMED_ARGS
# ("--steps 5 --warmup-steps 2"), BENCH_ARGS (extra arguments for every bench call), TESTS_S (240),
# CHECK_S (150), GPU_TEST_PATHS (tests), PY (python3), ALLOW_CPU (0).
# A dry run on CPU: three stand-ins (125M, 1B, 125M_ls at tiny shapes, compile off) that wait
# DRY_COMPILE_S seconds where the first step would compile (honoured only with ALLOW_CPU=1):
#   ALLOW_CPU=1 DRY_COMPILE_S=90 OUT=$(mktemp -d) launch/gpu_bench.sh
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${ROOT}"
MODE=${1:-presets}
PY=${PY:-python3}
TORCHDATA_FETCH="launch/gpu_bench.sh fetch"

case "${MODE}" in
    presets | tests) ;;
    fetch)
        # torchdata is pure Python (py3-none-any), so the wheel this machine gets installs anywhere.
        version=$(${PY} -c "import importlib.metadata as m; print(m.version('torchdata'))" 2>/dev/null || echo 0.11.0)
        exec ${PY} -m pip download --no-deps --only-binary=:all: "torchdata==${version}" -d .whl/ ;;
    *) echo "usage: launch/gpu_bench.sh [presets | tests | fetch]" >&2; exit 2 ;;
esac

OUT=${OUT:-bench_results}
mkdir -p "${OUT}"
OUT=$(cd "${OUT}" && pwd)
SUMMARY=${OUT}/summary.md
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")
BUDGET_S=${BUDGET_S:-420}
PRESET_S=${PRESET_S:-240}
MIN_PRESET_S=${MIN_PRESET_S:-60}
TIMED_ARGS=${TIMED_ARGS:-"--steps 5 --warmup-steps 2"}
TESTS_S=${TESTS_S:-240}
CHECK_S=${CHECK_S:-150}
GPU_TEST_PATHS=${GPU_TEST_PATHS:-tests}

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
# Before anything slow: is torchdata there (found, not imported: that would import torch)?
if ! ${PY} -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torchdata') is None)"; then
    NO_TORCHDATA="gpu_bench: no torchdata (the tests and the trainer need it): run '${TORCHDATA_FETCH}' where there is network and bring .whl/ along"
    echo "${NO_TORCHDATA}" | tee "${SUMMARY}" >&2
    [ "${MODE}" = tests ] && exit 1
fi
# The same allocator setting as the launch scripts, so that peaks and fragmentation match training.
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}
export TORCHINDUCTOR_CACHE_DIR=${WORK}/inductor_cache

{
    [ -n "${NO_TORCHDATA:-}" ] && echo "${NO_TORCHDATA}" && echo
    echo "# GPU check (${MODE}) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo '```'
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2
    # One interpreter for every version (importing torch takes seconds); exit status 3: no CUDA.
    ${PY} - <<'PYTHON'
import importlib.metadata as m, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn",
      torch.backends.cudnn.version())
for package in ("transformers", "torchdata"):
    try:
        print(package, m.version(package))
    except m.PackageNotFoundError:
        print(package, "not installed")
sys.exit(0 if torch.cuda.is_available() else 3)
PYTHON
    echo "rc=$?" > "${WORK}/cuda_rc"
    echo '```'
} > "${SUMMARY}.tmp" 2>&1
mv "${SUMMARY}.tmp" "${SUMMARY}"
cat "${SUMMARY}"

CUDA=1
grep -q "rc=0" "${WORK}/cuda_rc" || CUDA=0
DRY_ARGS=()
if [ "${CUDA}" = 0 ]; then
    if [ "${ALLOW_CPU:-0}" != 1 ]; then
        echo "gpu_bench: no CUDA device (ALLOW_CPU=1 for a dry run)" | tee -a "${SUMMARY}" >&2
        exit 1
    fi
    # The dry run: stand-ins for a small, a large and an LS preset at tiny shapes; compiling on CPU
    # would measure nothing, so DRY_COMPILE_S stands in for it.
    PRESETS=${PRESETS:-"125M 1B 125M_ls"}
    BENCH_ARGS=${BENCH_ARGS:-"--seq-len 32 --local-batch-size 2 --baseline-batch-size 2 --model.dim 64 --model.n_layers 2 \
--model.n_heads 4 --model.n_kv_heads 2 --model.ffn_dim 128 --model.vocab_size 300 --compile.enable false"}
    DRY_ARGS=(--dry-compile-s "${DRY_COMPILE_S:-0}")
    [ "${MODE}" = presets ] && printf '\nDry run on CPU: tiny stand-ins, %s s of waiting in place of each compile.\n' \
        "${DRY_COMPILE_S:-0}" >> "${SUMMARY}"
else
    PRESETS=${PRESETS:-"125M 1B 125M_ls 350M 1.5B 600M 350M_ls"}
    BENCH_ARGS=${BENCH_ARGS:-""}
fi

# Everything but the summary, as one archive, replaced atomically (a kill mid-tar keeps the last).
archive() {
    local part=${OUT}/.all_results.part
    tar czf "${part}" -C "${WORK}" --exclude inductor_cache --exclude site --exclude synthetic_tokens . 2> /dev/null \
        && mv "${part}" "${OUT}/all_results.tar.gz" || rm -f "${part}"
}

# limited NAME LIMIT_S COMMAND...: COMMAND under a timeout of LIMIT_S, its output to the console
# and ${WORK}/logs/NAME.log; sets STATUS to "ok", "exit N" or "timed out after N s".
limited() {
    local name=$1 limit_s=$2
    shift 2
    mkdir -p "${WORK}/logs"
    echo "== ${name} (at most ${limit_s} s, at ${SECONDS} s of ${BUDGET_S})"
    timeout --signal=TERM --kill-after=10 "${limit_s}" "$@" 2>&1 | tee "${WORK}/logs/${name}.log"
    local rc=${PIPESTATUS[0]}
    STATUS=ok
    if [ "${rc}" -eq 124 ] || [ "${rc}" -eq 137 ]; then
        STATUS="timed out after ${limit_s} s"
    elif [ "${rc}" -ne 0 ]; then
        STATUS="exit ${rc}: $(tail -2 "${WORK}/logs/${name}.log" | tr '\n`|' '  /' | cut -c1-200)"
    fi
}

# The time one step may have: at most LIMIT_S, and never past the budget.
limit_for() {
    local left=$((BUDGET_S - SECONDS)) limit_s=$1
    [ "${left}" -lt "${limit_s}" ] && limit_s=${left}
    echo "${limit_s}"
}

if [ "${MODE}" = presets ]; then
    {
        echo
        echo "## Presets: one process each (compile, then ${TIMED_ARGS} of ours, then the original-style HF Llama)"
        echo
        ${PY} launch/gpu_summary.py header
    } >> "${SUMMARY}"
    skipped=""
    for preset in ${PRESETS}; do
        if [ $((BUDGET_S - SECONDS)) -lt "${MIN_PRESET_S}" ]; then
            skipped="${skipped} ${preset}"
            continue
        fi
        begin=${SECONDS}
        # shellcheck disable=SC2086
        limited "${preset}" "$(limit_for "${PRESET_S}")" ${PY} -m mobilellm_train.bench --presets "${preset}" ${TIMED_ARGS} \
            ${BENCH_ARGS} ${DRY_ARGS[@]+"${DRY_ARGS[@]}"} --out "${WORK}/bench" --name "${preset}"
        ${PY} launch/gpu_summary.py row "${WORK}/bench/${preset}.json" "${preset}" $((SECONDS - begin)) "${SECONDS}" \
            "${STATUS}" >> "${SUMMARY}" 2>&1
        archive
    done
    [ -n "${skipped}" ] && printf '\nSkipped, under %s s of the budget left:%s\n' "${MIN_PRESET_S}" "${skipped}" >> "${SUMMARY}"
else
    { echo; echo "## Tests marked gpu"; echo; } >> "${SUMMARY}"
    # shellcheck disable=SC2086
    limited gpu_tests "$(limit_for "${TESTS_S}")" ${PY} -m pytest -q -m gpu ${GPU_TEST_PATHS} -p no:cacheprovider
    echo "${STATUS}: \`$(tail -1 "${WORK}/logs/gpu_tests.log" | tr '`' "'")\`" >> "${SUMMARY}"
    archive
    { echo; echo "## The whole trainer, 125M"; echo; } >> "${SUMMARY}"
    limit=$(limit_for "${CHECK_S}")
    if [ "${limit}" -ge 30 ]; then
        limited gpu_check "${limit}" ${PY} launch/gpu_check.py --presets 125M --steps 20 --warmup-steps 10 \
            --out "${WORK}/gpu_check"
        echo "${STATUS}" >> "${SUMMARY}"
        ${PY} launch/gpu_summary.py check "${WORK}/gpu_check/gpu_check.json" >> "${SUMMARY}" 2>&1
    else
        echo "skipped: ${limit} s of the budget left" >> "${SUMMARY}"
    fi
fi

printf '\nDone in %s s of a %s s budget.\n' "${SECONDS}" "${BUDGET_S}" >> "${SUMMARY}"
archive
echo "gpu_bench: done in ${SECONDS}s; see ${SUMMARY} (everything else in ${OUT}/all_results.tar.gz)"
