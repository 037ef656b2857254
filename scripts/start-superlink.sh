#!/usr/bin/env bash
# Start the coordinator's SuperLink: TLS with the deployment's own CA, SuperNode authentication
# (only registered keys may join), the Control API on 127.0.0.1 only. Writes the `flwr` CLI
# connection "fedllama" into $FLWR_HOME/config.toml, then runs flower-superlink in this process.
#
#   scripts/start-superlink.sh --credentials DIR [--fleet-address 0.0.0.0:9092]
#       [--control-port 8000] [--database state/superlink.db]
#
# DIR comes from `fedllama credentials create DIR --address HOST ...`. Institutions reach the
# Fleet API port (9092) only. See docs/deploy-coordinator.md; `--dry-run` prints the command.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$repo/.venv}"
if [ -x "$venv/bin/fedllama" ]; then
    PATH="$venv/bin:$PATH"
fi
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"
exec fedllama deploy superlink "$@"
