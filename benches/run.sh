#!/usr/bin/env bash
# The one bench command: `bash benches/run.sh NAME [ARGS…]` runs benches/NAME.sh (see
# benches/README.md); with no name it lists them. Each prints its figures and, where it
# measures a peer, the ratio measured in the same run on the same machine.
set -euo pipefail
cd "$(dirname "$0")/.."
name="${1:-}"
if [ -z "$name" ] || [ ! -f "benches/$name.sh" ] || [ "$name" = run ] || [ "$name" = common ]; then
  echo "usage: bash benches/run.sh NAME [ARGS…], NAME one of:" >&2
  for f in benches/*.sh; do
    n=$(basename "$f" .sh)
    [ "$n" = run ] || [ "$n" = common ] || printf '  %-8s %s\n' "$n" "$(sed -n 2p "$f" | sed 's/^# //')" >&2
  done
  [ -z "$name" ] && exit 0 || exit 2
fi
shift
exec bash "benches/$name.sh" "$@"
