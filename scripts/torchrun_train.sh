#!/bin/bash
# Data-parallel training under torchrun's elastic agent that goes on by itself when a worker dies (docs/distributed.md).
#
# One agent per node, started where logs/ should be (the repository root, as for main.py), with the experiment
# and any other CLI arguments after the script:
#   export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1   # a fresh rendezvous store for each restart (see below)
#   torchrun --standalone --nproc_per_node 4 --max-restarts 3 --no-python \
#       scripts/torchrun_train.sh configs/resnet50_imagenet.yaml --config configs/presets/ddp.yaml --trainer.devices 4
#   torchrun --nnodes 2 --nproc_per_node 4 --max-restarts 3 --rdzv-id resnet50-run1 --rdzv-backend c10d \
#       --rdzv-endpoint node0:29500 --no-python scripts/torchrun_train.sh configs/resnet50_imagenet.yaml \
#       --config configs/presets/multinode.yaml
#
# When a worker fails (killed, out of memory, a lost node), the agent stops the others and starts them all again,
# up to --max-restarts times, with the same command: this script. It resumes from the run's last.ckpt
# (--ckpt_path last: exact, in the same run folder), so what a crash costs is the iterations since that checkpoint
# (--periodic_checkpoint.every_n_train_steps sets how many at most). The run lives under
# logs/torchrun/<rendezvous id>/, which the agent keeps across restarts; a new torchrun has a new id (--standalone
# draws one; on several nodes give one with --rdzv-id) and starts afresh instead of picking up another run's.

set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: torchrun [OPTIONS] --no-python scripts/torchrun_train.sh CONFIG [CLI ARGUMENTS...] (--no-python:" \
         "torchrun runs this script itself, not through python)" >&2
    exit 2
fi
if [ -z "${TORCHELASTIC_RUN_ID:-}" ] || [ "${TORCHELASTIC_RUN_ID}" = "none" ]; then
    echo "error: not under torchrun, or under it without a rendezvous id: run torchrun --no-python with" \
         "--standalone, or give --rdzv-id a name of its own for this run (its folder is logs/torchrun/<id>)" >&2
    exit 2
fi
if [ "${TORCHELASTIC_MAX_RESTARTS:-0}" != 0 ] && [ "${TORCHELASTIC_USE_AGENT_STORE:-}" = True ]; then
    # Measured with torch 2.14 and a 20-line script of plain torch.distributed: restarted workers hang or are refused
    # in init_process_group when the agent keeps one store for every round (reported for NCCL: pytorch#167288).
    echo "error: torchrun --max-restarts needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (a" \
         "fresh rendezvous store for each restart); start it as TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ..." >&2
    exit 2
fi
CONFIG=$1
shift
for argument in "$@"; do
    case "$argument" in
        --trainer.default_root_dir* | --trainer.logger.init_args.save_dir*)
            echo "error: $argument: this script keeps the run in logs/torchrun/<rendezvous id>/, where a restart" \
                 "finds it; leave the folder to it" >&2
            exit 2 ;;
    esac
done

RESUME_DIR="logs/torchrun/${TORCHELASTIC_RUN_ID}"
mkdir -p "$RESUME_DIR"
RESUME=()
if compgen -G "${RESUME_DIR}/*/version_*/checkpoints/last.ckpt" > /dev/null; then
    RESUME=(--ckpt_path last)
    if [ "${RANK:-0}" = 0 ]; then
        echo "restart ${TORCHELASTIC_RESTART_COUNT:-0}: resuming the run under ${RESUME_DIR}" \
             "(newest last.ckpt: $(ls -t "${RESUME_DIR}"/*/version_*/checkpoints/last.ckpt | head -1))" >&2
    fi
fi

exec "${PYTHON:-python}" "$(dirname "$0")/../main.py" fit \
    --config "$CONFIG" \
    --trainer.default_root_dir "$RESUME_DIR" \
    --trainer.logger.init_args.save_dir "$RESUME_DIR" \
    ${RESUME[@]+"${RESUME[@]}"} \
    "$@"
