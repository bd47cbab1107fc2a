#!/usr/bin/env bash
# Render a `fedbench report` page in headless Chromium, as a reader would see it, at desktop width
# (1400 px) and phone width (390 px), and write the screenshots beside the page:
#   report_desktop.png, report_phone.png   (the top of the page: leaderboard and first plots)
#   report_desktop_full.png, report_phone_full.png with --full (the whole page; large, not committed)
#
# usage: scripts/screenshot_report.sh [PAGE.html] [OUT_DIR] [--full]
#   PAGE.html  default results/default/report.html
#   OUT_DIR    default the page's directory
# needs: Debian's `chromium` (apt-get install chromium) or $CHROMIUM. With Pillow (a fedbench
# dependency: the script uses $PYTHON, else .venv/bin/python, else python3) the PNGs are shrunk to a
# 256-colour palette. Nothing is fetched: the page is self-contained, and Chromium runs with a
# throw-away profile and its background networking off.
set -euo pipefail

page=${1:-results/default/report.html}
out=${2:-$(dirname "$page")}
full=${3:-}
chromium=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || echo /usr/bin/chromium)}
[ -f "$page" ] || { echo "error: page '$page' does not exist (run: fedbench report --results DIR --out $page)" >&2; exit 2; }
[ -x "$chromium" ] || { echo "error: no Chromium at '$chromium' (apt-get install chromium, or set CHROMIUM)" >&2; exit 2; }
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
url="file://$(realpath "$page")"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT

shot() { # file width height
  "$chromium" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --window-size="$2,$3" --screenshot="$1" "$url" >/dev/null 2>&1
  # a 256-colour palette keeps a page of plots under a few hundred KB
  "$python" -c 'import sys; from PIL import Image; p = sys.argv[1]; Image.open(p).convert("RGB").quantize(256, method=Image.Quantize.MAXCOVERAGE).save(p, optimize=True)' "$1" 2>/dev/null \
    || echo "note: no Pillow for $python: $1 left as Chromium wrote it" >&2
  echo "wrote $1 ($2x$3, $(du -k "$1" | cut -f1) KB)"
}

shot "$out/report_desktop.png" 1400 3000
shot "$out/report_phone.png" 390 2400
if [ "$full" = "--full" ]; then
  shot "$out/report_desktop_full.png" 1400 12000
  shot "$out/report_phone_full.png" 390 12000
fi
