#!/usr/bin/env bash
# Print the `systemd-analyze security --offline=true` exposure of certmon's units
# (0.0 = fully sandboxed … 10.0 = unprotected). Offline mode reads the unit files as
# they are in the repo; no running systemd is needed. Target for the agent: <= 2.5.
# Usage: bench/unit_security.sh [-v]   (-v also prints the full table for the agent)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v systemd-analyze >/dev/null || { echo "systemd-analyze missing (apt-get install systemd)" >&2; exit 2; }
for unit in systemd/certmon-agent.service systemd/certmon-collector.service systemd/certmon-scan.service; do
  line=$(systemd-analyze security --offline=true --no-pager "$unit" 2>/dev/null | grep 'Overall exposure level')
  # "→ Overall exposure level for certmon-agent.service: 1.4 OK 🙂" → "certmon-agent.service 1.4 OK"
  echo "$line" | sed -E 's/.*for ([^:]+): ([0-9.]+) ([A-Z]+).*/\1 exposure=\2 \3/'
done
if [ "${1:-}" = "-v" ]; then
  systemd-analyze security --offline=true --no-pager systemd/certmon-agent.service | grep -v '^✓'
fi
