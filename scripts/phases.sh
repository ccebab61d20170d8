# Sourced by .ci/run and scripts/test.sh: wall-clock time per phase, reported at the end.
#   phase NAME COMMAND...   runs COMMAND and records its seconds under NAME
#   phases_report           prints the recorded phases (an EXIT trap of the outermost script)
# Phases go to the file $WILDLONG_PHASES, so that a script called by another adds to its table.
if [ -z "${WILDLONG_PHASES:-}" ]; then
  WILDLONG_PHASES=$(mktemp)
  export WILDLONG_PHASES
fi

phase() {
  local name=$1 t0=$SECONDS rc=0
  shift
  "$@" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$([ $rc -eq 0 ] && echo ok || echo "failed ($rc)")" \
    >> "$WILDLONG_PHASES"
  return $rc
}

phases_report() {
  [ -s "$WILDLONG_PHASES" ] || return 0
  echo
  echo "phase timings (wall clock; a phase marked ∥ ran in the background, beside the build):"
  awk -F'\t' '{ printf "  %-24s %6d s  %5.1f min  %s\n", $1, $2, $2 / 60, $3 }' "$WILDLONG_PHASES"
}
