#!/usr/bin/env bash
# One command of a `make demo` lane. Two lanes run side by side (`make -j2`), one torch thread each:
# the prompt-learning runs are too small to keep two threads busy (a CoOp run on the demo world: 27.8 s
# on one thread, 25.0 s on two; two one-thread runs side by side: 26.7 s for both), so two one-thread
# lanes nearly halve the wall time of the methods that follow the demo CLIP build.
#
#   tools/demo_lane.sh LOG COMMAND...
#
# The command's whole output (progress bars included) is appended to LOG; its result lines (those that
# start with "[promptdg]") also go to the terminal, so the two lanes' bars never overwrite each other.
# Exits with the command's status; when that is an error, the log's last 40 lines go to stderr first
# (the traceback would otherwise stay in the log).
set -uo pipefail
log=$1
shift
mkdir -p "$(dirname "$log")"
echo "\$ $*" >>"$log"
# A progress bar ends in a carriage return, not a newline, so a result line printed after it shares its
# line: split at both before picking the result lines.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$@" 2>&1 | tee -a "$log" | awk -v RS='[\r\n]' '/^\[promptdg\] /{print; fflush()}'
status=${PIPESTATUS[0]}
if [ "$status" -ne 0 ]; then
  echo "[promptdg] this lane's command failed (exit $status): $*; the end of $log:" >&2
  tail -n 40 "$log" | tr '\r' '\n' | tail -n 40 >&2
fi
exit "$status"
