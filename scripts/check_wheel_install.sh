#!/usr/bin/env bash
# What a pip user gets: build mixtune's wheel, install it (not editable) into a fresh virtual
# environment, and from a directory outside the repository run `mixtune demo --quick`, list the
# shipped example configs, and train one of them for 2 steps by the README's path
# (configs/static.yaml, read from the package) and from a copy made by `mixtune configs`.
#
#   bash scripts/check_wheel_install.sh [WORK_DIR]     # a few minutes; not part of CI
#
# torch==2.13.0 is installed first (on this project's machines a CPU wheel from local disk),
# then the wheel with -c constraints.txt, as the README's setup does. WORK_DIR (default: a new
# temporary directory) gets dist/, venv/ and outside/; it is left in place for inspection.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d -t mixtune-wheel-XXXXXX)}
PY=${PYTHON:-python3}
START=$SECONDS
unset PYTHONPATH # the installed package must be the one that runs, not a source tree
mkdir -p "$WORK"
step() { printf '\n== %s (%ds)\n' "$1" $((SECONDS - START)); }

step "build the wheel"
rm -rf "$WORK/dist"
# No build isolation: the building Python's setuptools (pyproject's build-system) is used, so
# the build needs no download.
"$PY" -m pip wheel --no-deps --no-build-isolation -q -w "$WORK/dist" "$REPO"
WHEEL=$(ls "$WORK"/dist/mixtune-*.whl)
echo "$WHEEL"
# The wheel must carry the example configs (package data), not only the code.
"$PY" - "$WHEEL" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["mixtune/configs/static.yaml", "mixtune/configs/accelerate/fsdp.yaml"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
print(f"{sum(n.startswith('mixtune/configs/') for n in names)} config files in the wheel")
EOF

step "a fresh virtual environment"
rm -rf "$WORK/venv"
"$PY" -m venv "$WORK/venv"
PIP="$WORK/venv/bin/pip"
"$PIP" install -q torch==2.13.0
"$PIP" install -q -c "$REPO/constraints.txt" "$WHEEL"

OUT="$WORK/outside"
rm -rf "$OUT"
mkdir -p "$OUT"
cd "$OUT"
MIXTUNE="$WORK/venv/bin/mixtune"
"$WORK/venv/bin/python" - <<'EOF'
import mixtune, sys
where = mixtune.__file__
print("mixtune imported from", where)
assert "site-packages" in where, "mixtune must come from the installed wheel"
EOF

step "mixtune demo --quick"
"$MIXTUNE" demo --quick --output-dir "$OUT/demo"
test -f "$OUT/demo/report.html"

step "mixtune configs"
"$MIXTUNE" configs
"$MIXTUNE" configs static my_static.yaml

step "mixtune train configs/static.yaml (the README's path, no configs/ here)"
"$MIXTUNE" train configs/static.yaml max_steps=2 output_dir="$OUT/runs/static"
test -f "$OUT/runs/static/summary.json"

step "mixtune train my_static.yaml (the copy)"
"$MIXTUNE" train my_static.yaml max_steps=2 output_dir="$OUT/runs/copy" progress=false
test -f "$OUT/runs/copy/summary.json"

step "passed"
echo "wheel install check passed in $((SECONDS - START)) s ($WORK)"
