#!/usr/bin/env bash
# The results ledger's evidence runs: each experiment for each seed at a schedule scale, fit on the 45k/5k split,
# its final weights tested on the full test set and on test_range (the exact test images of ../shared/data), both
# tests recorded in results/ (python -m resnet_lab.paper record).
#
#   SCALE=0.0625 SEEDS="0 1" EXPERIMENTS="resnet20_cifar plain20_cifar" scripts/evidence_cifar.sh [main.py options]
#
# Options after the script name go to every fit (e.g. --config configs/presets/bf16.yaml on a GPU). Data comes
# from --data.root or $RESNET_LAB_DATA, as for main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-0.0625}
SEEDS=${SEEDS:-"0 1"}
EXPERIMENTS=${EXPERIMENTS:-"resnet20_cifar plain20_cifar"}
TEST_RANGE=${TEST_RANGE:-"[0, 1017]"}
RECORD=${RECORD:-1}  # 0: leave results/ as it is (record the runs later)

for seed in $SEEDS; do
  for experiment in $EXPERIMENTS; do
    python -m resnet_lab.paper seeds "configs/$experiment.yaml" --seeds "$seed" --schedule_scale "$SCALE" "$@"
    run="logs/$(python -c "from resnet_lab.identity import run_name; print(run_name('$experiment', $SCALE))")/seed$seed"
    python main.py test --config "$run/config.yaml" --ckpt_path "$run/checkpoints/last.ckpt" \
      --data.test_range "$TEST_RANGE" --trainer.enable_progress_bar false
    if [ "$RECORD" = 1 ]; then python -m resnet_lab.paper record "$run"; fi
  done
done
