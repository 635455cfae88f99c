#!/usr/bin/env bash
# The seed's step 2: every model of configs/ on every fold. GPUS>1 launches torchrun (DDP).
#   CACHE=/data/cache RUNS=/data/runs GPUS=8 sh/train_all.sh
set -euo pipefail
CACHE=${CACHE:-cache}
RUNS=${RUNS:-runs}
GPUS=${GPUS:-1}
MODELS=${MODELS:-"seresnext50_224 seresnext50_512 vgg19 efficientnet_b0 efficientnet_b2 resnet34"}
FOLD=${FOLD:-all}
RESUME=${RESUME:-}   # RESUME=--resume continues interrupted runs
EXTRA=${EXTRA:-}     # more arguments for every run, e.g. EXTRA="--set train.epochs=3"

for m in $MODELS; do
  if [ "$GPUS" -gt 1 ]; then
    launch=(torchrun --standalone --nproc_per_node "$GPUS" -m ichdet)
  else
    launch=(${ICHDET:-ichdet})
  fi
  "${launch[@]}" train --config "configs/$m.yaml" --data "$CACHE/train" --out "$RUNS/$m" --fold "$FOLD" $RESUME $EXTRA
done
