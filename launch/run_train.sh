#!/usr/bin/env bash
# Train on one machine with torchrun; arguments pass through to mobilellm-train.
#   NGPU=8 launch/run_train.sh --config train_configs/125M.toml --data.path /data/tokens
# Run it again with the same --job.dump_folder to resume from the newest checkpoint.
set -euo pipefail

NGPU=${NGPU:-8}
exec torchrun --standalone --nnodes=1 --nproc_per_node="${NGPU}" \
    --local-ranks-filter "${LOG_RANKS:-0}" --role rank --tee 3 \
    -m mobilellm_train.train "$@"
