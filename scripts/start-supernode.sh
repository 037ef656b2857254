#!/usr/bin/env bash
# Start an institution's SuperNode: TLS to the coordinator's SuperLink (verified with the
# deployment's ca.crt), authenticated with this institution's registered key, and this
# institution's settings as node config (data path, LoRA rank, device, batch size, steps).
#
#   scripts/start-supernode.sh --superlink HOST:9092 --ca ca.crt --key NAME.key \
#       --data-path /data/train.jsonl [--lora-rank 16] [--device cuda] [--batch-size 4] \
#       [--local-steps 8] [--port 9094]
#
# It refuses to start when the data path is missing or unreadable. Needs outbound access to
# HOST:9092 only; opens no port to the network. See docs/deploy-institution.md.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ -x "$venv/bin/fedllama" ]; then
    PATH="$venv/bin:$PATH"
fi
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
exec fedllama deploy supernode "$@"
