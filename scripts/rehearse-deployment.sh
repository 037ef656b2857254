#!/usr/bin/env bash
# Rehearse a multi-institution deployment on this machine with the commands the guides give:
# fresh credentials, a SuperLink with TLS and SuperNode authentication, registered SuperNodes
# (each with its own HOME, so its own model cache, as on separate machines) and `flwr run` of
# CONFIG. Node i trains on demo institution i's examples. At the end it prints every node's
# base-model load time per message (the first builds the cached base, later ones read it).
#
#   scripts/rehearse-deployment.sh [--ranks 8,16] CONFIG [key=value ...]
#   scripts/rehearse-deployment.sh --ranks 8,16 simulations/configs/deploy.yaml server.rounds=2
#
# --ranks gives one LoRA rank per node (default: two nodes at lora.r). Everything lives in a
# new directory under ${TMPDIR:-/tmp} (kept, its path is printed) and every process started
# here is stopped on exit. Ports are picked at random from 20000-59999.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ -x "$venv/bin/fedllama" ]; then
    PATH="$venv/bin:$PATH"
fi
ranks=""
if [ "${1:-}" = "--ranks" ]; then
    ranks="$2"
    shift 2
fi
if [ $# -lt 1 ]; then
    sed -n '2,13p' "$0" >&2
    exit 2
fi
config="$1"
shift
cd "$repo"  # CONFIG is relative to the app directory, as in `flwr run`

work="$(mktemp -d "${TMPDIR:-/tmp}/fedllama-rehearsal.XXXXXX")"
overrides="output.dir=$work/coordinator/run $*"  # a later output.dir=... wins
port() { echo $((20000 + RANDOM % 40000)); }
fleet="127.0.0.1:$(port)"
control="$(port)"
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
started=()

descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
cleanup() {
    local pid all=()
    for pid in "${started[@]}"; do
        all+=("$pid" $(descendants "$pid"))
    done
    for pid in "${all[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    sleep 5
    for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    echo "rehearsal files and logs: $work"
}
trap cleanup EXIT
run_as() {  # run_as WHO CMD...: run CMD with WHO's own HOME and FLWR_HOME
    local who="$1"
    shift
    mkdir -p "$work/$who/.flwr"
    HOME="$work/$who" FLWR_HOME="$work/$who/.flwr" "$@"
}

# Institutions' data: demo institution i's examples for node i.
node_ranks=()
[ -z "$ranks" ] || IFS=, read -r -a node_ranks <<<"$ranks"
nodes=${#node_ranks[@]}
[ "$nodes" -ge 1 ] || nodes=2
run_as coordinator python - "$work" "$nodes" "$config" $overrides <<'EOF'
import json, sys
from pathlib import Path
from fedllama import config, data, model
work, nodes, path, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
cfg = config.load(path, overrides)
pool = data.load_pool(cfg.data, model.cache_root(cfg.model))
for i, name in zip(range(nodes), sorted(pool)):
    out = work / f"node-{i}" / "data" / f"{name}.jsonl"
    out.parent.mkdir(parents=True)
    out.write_text("".join(json.dumps(example) + "\n" for example in pool[name]))
EOF

# Coordinator: credentials, SuperLink (as in docs/deploy-coordinator.md).
names=()
for i in $(seq 0 $((nodes - 1))); do names+=(--institution "node-$i"); done
run_as coordinator fedllama credentials create "$work/coordinator/credentials" --address localhost \
    "${names[@]}" >/dev/null
run_as coordinator setsid "$repo/scripts/start-superlink.sh" --credentials "$work/coordinator/credentials" \
    --fleet-address "$fleet" --control-port "$control" >"$work/superlink.log" 2>&1 &
started+=($!)
until grep -q "Uvicorn running on https" "$work/superlink.log"; do sleep 0.5; done
keys=()
for i in $(seq 0 $((nodes - 1))); do keys+=("$work/coordinator/credentials/nodes/node-$i.pub"); done
run_as coordinator fedllama deploy register "${keys[@]}"

# Institutions: one SuperNode each (as in docs/deploy-institution.md).
for i in $(seq 0 $((nodes - 1))); do
    rank=()
    [ -n "${node_ranks[$i]:-}" ] && rank=(--lora-rank "${node_ranks[$i]}")
    run_as "node-$i" setsid "$repo/scripts/start-supernode.sh" --superlink "$fleet" \
        --ca "$work/coordinator/credentials/ca.crt" \
        --key "$work/coordinator/credentials/nodes/node-$i.key" \
        --data-path "$(ls "$work/node-$i"/data/*.jsonl)" "${rank[@]}" --port "$(port)" \
        >"$work/node-$i.log" 2>&1 &
    started+=($!)
done
for i in $(seq 0 $((nodes - 1))); do
    until grep -q "SuperNode ID" "$work/node-$i.log"; do sleep 0.5; done
done

# The run.
run_as coordinator flwr run . fedllama --stream \
    --run-config "config=\"$config\" overrides=\"$overrides\"" | tee "$work/run.log"
for i in $(seq 0 $((nodes - 1))); do
    echo "node-$i base model load per message:"
    grep -o "base model loaded in .*" "$work/node-$i.log" | sed 's/^/  /'
done
