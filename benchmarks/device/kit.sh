#!/usr/bin/env bash
# Gather into .whl/ (repo root) every wheel benchmarks/device/run.sh needs beyond the lent GPU image: the
# names in benchmarks/device/kit.txt, for CPython 3.12 on manylinux x86_64, no dependencies pulled (each one
# is named). Refuses more than 64 MiB (what travels with one device call) and prints the total.
#   bash benchmarks/device/kit.sh            # then carry [".whl"] in the device call (docs/gpu-check.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=.whl
limit=$((64 * 1024 * 1024))
py=${PYTHON:-python3}
mkdir -p "$kit"
# .whl/ must not be committed: ignore it locally if the repository's .gitignore does not already.
if git rev-parse --git-dir >/dev/null 2>&1 && ! git check-ignore -q "$kit/x.whl"; then
  echo "/$kit/" >> "$(git rev-parse --git-path info/exclude)"
fi
mapfile -t wanted < <(grep -v '^\s*#' benchmarks/device/kit.txt | grep -v '^\s*$')
rm -f "$kit"/*.whl
if [ ${#wanted[@]} -gt 0 ]; then
  "$py" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$kit" "${wanted[@]}"
fi
# One wheel per name: two versions of one package stop the install on the device.
names=$(for f in "$kit"/*.whl; do basename "$f" | cut -d- -f1 | tr 'A-Z-.' 'a-z__'; done | sort)
dupes=$(uniq -d <<<"$names")
if [ -n "$dupes" ]; then echo "error: more than one wheel of: $dupes" >&2; exit 1; fi
count=$(ls "$kit"/*.whl 2>/dev/null | wc -l)
if [ "$count" -ne "${#wanted[@]}" ]; then
  echo "error: kit.txt names ${#wanted[@]} packages but $kit holds $count wheels" >&2; exit 1
fi
total=$(cat "$kit"/*.whl | wc -c)
ls -l "$kit"/*.whl | awk '{printf "  %8.1f KiB  %s\n", $5 / 1024, $NF}'
printf 'kit: %d wheels, %.2f MiB in %s (limit 64 MiB per device call, the working tree included)\n' \
  "$count" "$(awk -v b="$total" 'BEGIN { print b / 1048576 }')" "$kit"
if [ "$total" -gt "$limit" ]; then echo "error: the kit is over 64 MiB" >&2; exit 1; fi
