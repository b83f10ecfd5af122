#!/usr/bin/env bash
# Train on one machine with torchrun; arguments pass through to mobilellm-train.
#   NGPU=8 launch/run_train.sh --config train_configs/125M.toml --data.path /data/tokens
# Run it again with the same --job.dump_folder to resume from the newest checkpoint.
# SIGTERM, SIGINT (Ctrl-C) and SIGUSR1 reach every rank (mobilellm_train.launch): they save at the
# next step and the script exits 0; a second Ctrl-C aborts without saving.
set -euo pipefail

NGPU=${NGPU:-8}
export PYTORCH_ALLOC_CONF=${PYTORCH_ALLOC_CONF:-expandable_segments:True}  # against fragmentation (TorchTitan's setting)
exec "${PYTHON:-python}" -m mobilellm_train.launch --standalone --nnodes=1 --nproc_per_node="${NGPU}" \
    --local-ranks-filter "${LOG_RANKS:-0}" --role rank --tee 3 \
    -m mobilellm_train.train "$@"
