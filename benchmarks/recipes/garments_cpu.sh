#!/usr/bin/env bash
# A garment model on 2 CPU cores in under 20 minutes: ResNet18, BCE over the garment's category, 64 px crops.
#
#   imat data prepare ../shared/data/ccp-dev --garments --image-size 64 --out DATA_DIR
#   benchmarks/recipes/garments_cpu.sh DATA_DIR WORKDIR          # leaves WORKDIR/model.onnx
#
# DATA_DIR must hold a 64 px garment dataset (the default 128 px trains about 6x slower per image on CPU;
# `imat train` says so clearly when the sizes differ). ccp-dev gives 1949 train / 509 validation garments.
# Budget (measured, see benchmarks/RESULTS.md "Garments"): 1500 steps of batch 32 at ~108 crops/s on
# 2 idle cores is ~7.5 min of training; evaluation every 300 steps, export and eval add ~1 min.
# Rerunning resumes the run from its last checkpoint.
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 DATA_DIR WORKDIR" >&2
  exit 2
fi
DATA_DIR=$1
WORKDIR=$2
STEPS=${IMAT_GARMENT_STEPS:-1500}
mkdir -p "$WORKDIR"

imat train --objective bce --arch resnet18 --image-size 64 --data "$DATA_DIR" --workdir "$WORKDIR/run" \
  --steps "$STEPS" --lr-schedule cosine --eval-every 300 --checkpoint-every 500 --log-every 100
imat export "$WORKDIR/run" --out "$WORKDIR/model.onnx"
echo "garment model: $WORKDIR/model.onnx"
