#!/usr/bin/env bash
# The seed's step 1: DICOM -> cache, for the training and the test images.
#   RSNA=/data/rsna CACHE=/data/cache SIZE=512 sh/preprocess.sh
set -euo pipefail
RSNA=${RSNA:-data/rsna}
CACHE=${CACHE:-cache}
SIZE=${SIZE:-512}
FOLDS=${FOLDS:-5}
WORKERS=${WORKERS:-$(nproc)}
ICHDET=${ICHDET:-ichdet}

$ICHDET preprocess --images "$RSNA/stage_2_train_images" --labels "$RSNA/stage_2_train.csv" \
  --out "$CACHE/train" --size "$SIZE" --folds "$FOLDS" --workers "$WORKERS"
$ICHDET preprocess --images "$RSNA/stage_2_test_images" --out "$CACHE/test" --size "$SIZE" --workers "$WORKERS"
