#!/bin/sh
# Init container of the Triton pod (image amazon/aws-cli).
#
# 1. Copy the model repository from an S3-compatible object store
#    (MODEL_REPOSITORY_URL, optional AWS_ENDPOINT_URL) into the pod's volume.
# 2. Check every file against the MANIFEST.sha256 that
#    deploy/k8s/tools/stage_models.py wrote before the upload, so a partial or
#    stale upload fails here instead of inside Triton.
# 3. When MODEL_CONFIG_NAME is set (gpu overlay), install each
#    $MODEL_CONFIGS_DIR/<model>.pbtxt as <model>/configs/$MODEL_CONFIG_NAME.pbtxt,
#    which Triton picks with --model-config-name.
set -eu

: "${MODEL_REPOSITORY_URL:?is not set (ConfigMap triton-model-source)}"
DEST="${MODEL_DIR:-/models}"
CONFIGS="${MODEL_CONFIGS_DIR:-/model-configs}"

# An empty value in the ConfigMap means "AWS itself".
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then unset AWS_ENDPOINT_URL; fi
case "${S3_ADDRESSING_STYLE:-auto}" in
  auto) ;;
  path | virtual) aws configure set default.s3.addressing_style "$S3_ADDRESSING_STYLE" ;;
  *) echo "S3_ADDRESSING_STYLE=$S3_ADDRESSING_STYLE is not auto, path or virtual" >&2; exit 2 ;;
esac

echo "fetching ${MODEL_REPOSITORY_URL} into ${DEST}"
aws s3 sync --no-progress --only-show-errors "${MODEL_REPOSITORY_URL%/}/" "${DEST}/"

cd "$DEST"
if [ ! -f MANIFEST.sha256 ]; then
  echo "${MODEL_REPOSITORY_URL} has no MANIFEST.sha256: publish it with 'make models-push'" >&2
  exit 1
fi
sha256sum --check --quiet --strict MANIFEST.sha256
echo "verified $(wc -l < MANIFEST.sha256) files against MANIFEST.sha256"

if [ -n "${MODEL_CONFIG_NAME:-}" ]; then
  for file in "$CONFIGS"/*.pbtxt; do
    [ -e "$file" ] || continue
    model=$(basename "$file" .pbtxt)
    if [ ! -f "$DEST/$model/config.pbtxt" ]; then
      echo "config $file is for model '$model', which the repository does not have" >&2
      exit 1
    fi
    mkdir -p "$DEST/$model/configs"
    cp "$file" "$DEST/$model/configs/$MODEL_CONFIG_NAME.pbtxt"
    echo "installed $model/configs/$MODEL_CONFIG_NAME.pbtxt"
  done
fi
