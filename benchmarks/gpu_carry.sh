#!/usr/bin/env bash
# Builds in this checkout what the `grids` step of benchmarks/gpu_check.py needs carried to a GPU machine (which
# has no network, no pycocotools and no Fashion-MNIST), checks that git ignores every carried path (the device
# tool carries only ignored paths) and that they fit, then prints the carry list and the device command.
#
# Usage: bash benchmarks/gpu_carry.sh [WHEEL]     WHEEL: pycocotools' cp312 abi3 wheel (default: /tmp/pcw/*.whl)
# Needs here: Fashion-MNIST (for the detection data), and the accuracy teacher and student subset in
# benchmarks/runs (python benchmarks/alpha.py trains and writes them).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
wheel=${1:-$(ls /tmp/pcw/pycocotools-*.whl | head -n 1)}

# 1. pycocotools, unpacked (pure files: nothing is installed); gpu_check puts .gpu_deps on every PYTHONPATH
unzip -qo "$wheel" 'pycocotools/*' 'pycocotools-*.dist-info/*' -d .gpu_deps

# 2. the detection grid's composited data (the full plan), of which the grid reads only the COCO part
data=$(PYTHONPATH=$PWD "$python" -c 'import sys; sys.path.insert(0, "benchmarks")
from detection import Plan; from segmentation import prepare_data; print(prepare_data(Plan()))')
carried=benchmarks/runs/gpu_carry/detection/$(basename "$data")
rm -rf "$carried" && mkdir -p "$carried"
cp -r "$data"/{train,val,annotations,classes.txt,done} "$carried"/

# 3. the accuracy teacher (trained) and the students' subset, where accuracy.py keeps them
paths=(.gpu_deps "$carried" benchmarks/runs/teacher/config.json benchmarks/runs/teacher/metrics.jsonl
       benchmarks/runs/teacher/last.safetensors benchmarks/runs/data/fmnist-train5000-test10000)
for path in "${paths[@]}"; do
  [ -e "$path" ] || { echo "error: $path is missing; run python benchmarks/alpha.py here first" >&2; exit 1; }
  git check-ignore -q "$path" || { echo "error: git does not ignore $path; the device tool carries only ignored paths" >&2; exit 1; }
done
bytes=$(du -cb "${paths[@]}" | tail -n 1 | cut -f 1)
[ "$bytes" -lt $((60 * 1024 * 1024)) ] || { echo "error: the carried paths take $bytes bytes, over 60 MiB" >&2; exit 1; }

echo "carried: $((bytes / 1024 / 1024)) MiB in ${#paths[@]} paths"
printf 'carry: ['; printf '"%s", ' "${paths[@]:0:${#paths[@]}-1}"; printf '"%s"]\n' "${paths[-1]}"
echo 'command: PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --only machine,grids'
