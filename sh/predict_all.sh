#!/usr/bin/env bash
# The seed's step 3: predict the test cache with every trained model, ensemble, write the submission.
#   CACHE=/data/cache RUNS=/data/runs RSNA=/data/rsna sh/predict_all.sh
set -euo pipefail
CACHE=${CACHE:-cache}
RUNS=${RUNS:-runs}
RSNA=${RSNA:-data/rsna}
OUT=${OUT:-submission}
MODELS=${MODELS:-"seresnext50_224 seresnext50_512 vgg19 efficientnet_b0 efficientnet_b2 resnet34"}
ICHDET=${ICHDET:-ichdet}

mkdir -p "$OUT"
preds=()
for m in $MODELS; do
  $ICHDET predict --run "$RUNS/$m" --data "$CACHE/test" --out "$OUT/$m.parquet"
  preds+=("$OUT/$m.parquet")
done
$ICHDET ensemble "${preds[@]}" --out "$OUT/submission.csv" \
  --sample-submission "$RSNA/stage_2_sample_submission.csv"
