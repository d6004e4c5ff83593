#!/usr/bin/env bash
# A CI pipeline with the Carrara CLI: register the dataset (once), pin a snapshot, train on it,
# promote the new model version to `champion` and roll it out. Every step fails the job on error.
#
#   export CARRARA_API_URL=http://127.0.0.1:8000 CARRARA_TOKEN=crr_...   # an editor token
#   DATASET=payments TOPIC=payments MODEL=payments-fraud examples/ci-pipeline.sh
set -euo pipefail

DATASET=${DATASET:-payments}
TOPIC=${TOPIC:-payments}
MODEL=${MODEL:-payments-fraud}
OUTPUT_TOPIC=${OUTPUT_TOPIC:-$TOPIC.predictions}
CARRARA=${CARRARA:-carrara}
json_field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

# 1. The dataset: the topic, its key and label, the features (created on the first run only).
if ! $CARRARA datasets show "$DATASET" --json >/dev/null 2>&1; then
  $CARRARA datasets create -f - <<YAML
name: $DATASET
topic: $TOPIC
key_field: card_id
event_time_field: ts
label_field: fraud
task: binary
features:
  - {name: amount, type: float}
  - {name: hour, type: int}
  - {name: velocity, type: float}
  - {name: merchant, type: category}
YAML
fi

# 2. A snapshot: per-partition offsets, so this exact training set can be replayed forever.
VERSION=$($CARRARA datasets snapshot "$DATASET" --description "CI ${CI_COMMIT:-local}" --json \
  | json_field '["number"]')

# 3. Train on it and wait; a failed run fails the pipeline. A retried job reuses the same run.
RUN=$($CARRARA runs start --dataset "$DATASET" --version "$VERSION" --algorithm lightgbm \
  --param n_estimators=100 --model "$MODEL" \
  --idempotency-key "ci-${CI_PIPELINE_ID:-$DATASET-v$VERSION}" --wait --timeout 900 --json)
echo "AUC $(echo "$RUN" | json_field '["metrics"]["auc"]') (baseline $(echo "$RUN" | json_field '["metrics"]["baseline_auc"]'))"
MODEL_VERSION=$($CARRARA models show "$MODEL" --json | json_field '["versions"][-1]["version"]')

# 4. Promote and deploy: the deployment names the alias, the server pins the version it points to.
$CARRARA models alias "$MODEL" champion --version "$MODEL_VERSION"
$CARRARA deploy --reason "CI: $MODEL v$MODEL_VERSION" -f - <<YAML
name: $DATASET-scoring
input_topic: $TOPIC
output_topic: $OUTPUT_TOPIC
key_field: card_id
variants:
  - {name: champion, model: $MODEL, alias: champion, weight: 100}
YAML
$CARRARA deployments show "$DATASET-scoring"
