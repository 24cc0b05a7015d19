#!/usr/bin/env bash
# Run a test selection N times in a row beside two busy CPU loops; stop at the first failure and keep its output.
#
#   bash benchmarks/loaded_passes.sh 20 tests/test_torchft.py      # issue 29: 20 consecutive loaded passes
#
# Each pass runs `python -m pytest -q -x -m "not slow" SELECTION` with its own --basetemp (/tmp/loaded_passes/itK),
# where the torchft tests keep every replica's log; one line per pass goes to stdout. Exit status 1 at a failure.
set -u
n=$1; shift
cd "$(dirname "$0")/.."
out=/tmp/loaded_passes
mkdir -p "$out"
yes > /dev/null & busy1=$!
yes > /dev/null & busy2=$!
trap 'kill $busy1 $busy2' EXIT
for i in $(seq 1 "$n"); do
  rm -rf "$out/it$i"
  if python -m pytest -q -x -m "not slow" "$@" -p no:cacheprovider --basetemp "$out/it$i" > "$out/it$i.out" 2>&1; then
    echo "$(date +%T) pass $i of $n: $(tail -1 "$out/it$i.out") (load average $(cut -d' ' -f1 /proc/loadavg))"
  else
    echo "$(date +%T) FAILED at pass $i: $(tail -1 "$out/it$i.out"); output in $out/it$i.out and $out/it$i/"
    exit 1
  fi
done
