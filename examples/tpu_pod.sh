#!/bin/bash
# Data-parallel training on a Cloud TPU pod slice (e.g. v5p-32: 4 hosts).
# The same command runs on every host; train.py sees TPU_WORKER_HOSTNAMES
# and calls jax.distributed.initialize(), which needs no arguments on Cloud TPU.
# The workdir must be a shared file system (e.g. a Filestore/NFS mount) that
# every host can write: orbax writes each checkpoint from all hosts together.
set -euo pipefail
TPU_NAME=${TPU_NAME:?set TPU_NAME}
ZONE=${ZONE:?set ZONE}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd tversky_jax && pip install -e . 'jax[tpu]' &&
  python train.py --config configs/paper.py --workdir /mnt/shared/runs/paper \
      --config.data.root=/mnt/data/Dataset001_Lesions --config.train.batch_size=32"
# Preemption: the TPU maintenance/preemption notice reaches every host through
# JAX's preemption service; all hosts stop at one agreed step, save and exit 0.
# Re-running the command resumes from that checkpoint.
