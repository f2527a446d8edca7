#!/usr/bin/env bash
# The graph step's GPU checks and measurements (issue 15), as one prepared run; docs/benchmarks.md records what it
# prints, with the date, device and commit it prints. Stages, in order (name some to run only those):
#   tests     tests/test_graph_step.py on the GPU: the captured step against the eager one (fp32, deterministic
#             cuDNN), no host sync in a replay, and every CPU test of the graph step with the capture on
#   speed20   ms per iteration of ResNet-20: graph step alone and inside fit, the ordinary fit, the hand loop
#   fit20     the paper's whole ResNet-20 schedule (64k iterations, batch 128) with bf16 + gpu_fast + gpu_graph,
#             on random CIFAR-format files made there: wall time from the command to its exit
#   speed110  the same rows for ResNet-110
#   rows      the rows never measured on a GPU: the recipe presets (issue 14), ResNet-50 bf16 images/s (synthetic
#             224 px) and ResNet-1202 peak memory with activation checkpointing
# Estimated times on an H100/H200 (not yet measured: compiles dominate): tests 1-2 min, speed20 3-4 min, fit20 4-5
# min, speed110 6-8 min, rows 2-3 min. A session's device time is 15 minutes in all, the machine's start (a minute
# or two) included, and one command may run 10: run the stages in order of need, e.g. `tests fit20` first.
# On the device machine (no jsonargparse there: carry its wheels, made with pip download as the device README says):
#   run(command="RESNET_LAB_COMMIT=<commit> bash scripts/gpu_session.sh tests fit20", carry=[".whl"])
# Here, end to end on the CPU with tiny settings (nothing is captured on a CPU):
#   TINY=1 bash scripts/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
STAGES=${*:-tests speed20 fit20 speed110 rows}
TINY=${TINY:-0}
if ! python3 -c "import jsonargparse" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export RESNET_LAB_COMMIT=${RESNET_LAB_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
stage() { echo "== $(date -u +%FT%TZ) $1 (commit $RESNET_LAB_COMMIT)"; }
if [ "$TINY" = 1 ]; then
  ROUNDS=(--rounds 1) SMALL=(--trainer.max_steps 30 --data.val_size 100) PER_FILE=200
else
  ROUNDS=() SMALL=() PER_FILE=10000  # the real CIFAR-10's sizes: 5 x 10,000 training and 10,000 test images
fi
DATA=/tmp/cifar_random_$PER_FILE
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"

for s in $STAGES; do
  case $s in
    tests)
      stage "tests"
      # Every test of the file, end-to-end tier included, in one process: the device image has no pytest-xdist,
      # which the project's addopts (-n auto) would ask for.
      python3 -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/test_graph_step.py 2>&1 | tee "$OUT/tests.txt" \
        | tail -5 ;;
    speed20 | speed110)
      stage "$s"
      python3 benchmarks/train_speed.py --only graph --graph-depths "${s#speed}" "${ROUNDS[@]}" \
        --json "$OUT/train_speed_graph${s#speed}.json" 2>&1 | grep -v "^\[" | tee "$OUT/$s.txt" | tail -8 ;;
    fit20)
      stage "fit20: random CIFAR-format files"
      [ -d "$DATA" ] || python3 -c "import sys; sys.path.insert(0, 'tests'); from conftest import write_tiny_cifar; \
from pathlib import Path; write_tiny_cifar(Path('$DATA'), $PER_FILE)"
      stage "fit20: the whole schedule"
      start=$(date +%s.%N)
      python3 main.py fit --config configs/resnet20_cifar.yaml --config configs/presets/bf16.yaml \
        --config configs/presets/gpu_fast.yaml --config configs/presets/gpu_graph.yaml \
        --data.root "$DATA" --data.download false --trainer.enable_progress_bar false \
        --trainer.logger.init_args.save_dir "$OUT/logs" --test_after_fit true "${SMALL[@]}" 2>&1 | tail -25 \
        | tee "$OUT/fit20.txt"
      end=$(date +%s.%N)
      python3 -c "print(f'fit20 wall time, command to exit: {$end - $start:.1f} s')" | tee -a "$OUT/fit20.txt"
      find "$OUT/logs" -name run.json -exec cp {} "$OUT/fit20_run.json" \; ;;
    rows)
      stage "rows"
      python3 benchmarks/train_speed.py --only recipe resnet50 memory "${ROUNDS[@]}" \
        --json "$OUT/train_speed_rows.json" 2>&1 | grep -v "^\[" | tee "$OUT/rows.txt" | tail -8 ;;
    *) echo "unknown stage $s (tests speed20 fit20 speed110 rows)"; exit 1 ;;
  esac
done
rm -rf "$OUT/logs"  # events and checkpoints would not come back (a folder too deep); run.json did
