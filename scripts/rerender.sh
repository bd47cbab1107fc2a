#!/usr/bin/env bash
# Re-render every table, plot and the report page of a committed results directory from its
# records (the records are not touched): after a change to how results are summarised, e.g. the
# intervals. A sweep directory (with <field>=<value>/ subdirectories) re-renders each value and
# then its sweep report.
#
# usage: scripts/rerender.sh RESULTS [REFERENCE_ROW]   (REFERENCE_ROW default pilot-ctmoa)
# needs: fedbench installed (`pip install -e .`); uses $FEDBENCH, else `fedbench`.
set -euo pipefail

dir=${1:?usage: scripts/rerender.sh RESULTS [REFERENCE_ROW]}
ref=${2:-pilot-ctmoa}
fb=${FEDBENCH:-fedbench}

one() {  # one results directory: leaderboard, usage, versus, steps, plots (and the report if it had one)
    local d=$1
    $fb leaderboard --results "$d" --format markdown --out "$d/leaderboard.md"
    $fb leaderboard --results "$d" --format csv --out "$d/leaderboard.csv" --plots "$d"
    if [ -f "$d/expert_usage.md" ]; then
        $fb leaderboard --results "$d" --usage --format markdown --out "$d/expert_usage.md"
        $fb leaderboard --results "$d" --usage --format csv --out "$d/expert_usage.csv"
    fi
    for fmt in md csv; do
        [ -f "$d/versus_$ref.$fmt" ] || continue
        $fb leaderboard --results "$d" --versus "$ref" --format "${fmt/md/markdown}" --out "$d/versus_$ref.$fmt"
    done
    [ -f "$d/steps.md" ] && $fb leaderboard --results "$d" --steps --format markdown --out "$d/steps.md"
    [ -f "$d/report.html" ] && $fb report --results "$d" --out "$d/report.html"
    return 0
}

subs=("$dir"/*=*/)
if [ -d "${subs[0]}" ]; then
    for sub in "${subs[@]}"; do one "${sub%/}"; done
    $fb sweep-report --results "$dir"
else
    one "$dir"
fi
