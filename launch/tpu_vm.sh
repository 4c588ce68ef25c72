#!/usr/bin/env bash
# Runs one experiment main on every worker of a Cloud TPU VM slice (one process per host, all chips of
# the slice in one mesh; jax.distributed from the TPU environment, LVS_DISTRIBUTED=1).
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh setup
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_vm.sh run experiments/configs/lvs.py /mnt/shared/runs/lvs --config.model=/mnt/shared/models/llama3-8b
# The workdir and the model must be on a file system every worker sees (Filestore NFS or a gcsfuse
# mount at the same path); process 0 alone writes reports, orbax writes checkpoint shards from each host.
# Re-running the same command resumes from the workdir.
set -euo pipefail
TPU=${TPU:?TPU name}; ZONE=${ZONE:?zone}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=lvs_jax  # under each worker's home directory
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "${1:?setup | run}" in
  setup)  # this checkout's HEAD, copied to every worker, installed in a venv there
    git -C "$ROOT" archive --format=tar.gz -o /tmp/lvs_jax_src.tgz HEAD
    gcloud compute tpus tpu-vm scp /tmp/lvs_jax_src.tgz "$TPU": --zone="$ZONE" --worker=all
    ssh_all "set -e; mkdir -p $DIR && tar -xzf lvs_jax_src.tgz -C $DIR && cd $DIR && \
      python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]'"
    ;;
  run)
    CONFIG=${2:?config}; WORKDIR=${3:?workdir}; shift 3
    ssh_all "cd $DIR && HF_HUB_OFFLINE=1 LVS_DISTRIBUTED=1 .venv/bin/python experiments/$(basename "${CONFIG%%:*}") \
      --config=$CONFIG --workdir=$WORKDIR --config.dtype=bfloat16 $*"
    ;;
  *) echo "usage: $0 setup | run CONFIG WORKDIR [overrides]" >&2; exit 2 ;;
esac
