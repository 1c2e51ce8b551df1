#!/usr/bin/env bash
# The GPU suite of issue 14: correctness first, then the layer and training-step tables, the
# cifar10 recipe and one torchrun run. Results (JSON, logs) go to OUT, a few files per stage.
#
#   bash benchmarks/gpu_suite.sh OUT [STAGE ...]
#
# Stages, in this order by default (each fits in one 10-minute device command; give two or three
# per command): correctness layers train_step small_batch small_kernel cifar10 torchrun
#   correctness  benchmarks/gpu_correctness.py: every fast-path variant (torch / Triton with the
#                fused (B, C) kernels / Triton with the PyTorch (B, C) code; GN, IN, LN tokens, PN,
#                ILM + PN; fp32 / bf16 / fp16; contiguous / channels_last) against the float64 CPU
#                reference. The suite stops here if a variant fails.
#   layers       benchmarks/layers.py --device cuda --proxy: ResNet-50 GN shapes and ViT-B tokens
#                (fp32, bf16) against nn.GroupNorm / nn.LayerNorm and the published computation,
#                with the copy bandwidth; GN + PN-Act against timm's GroupNormAct.
#   train_step   benchmarks/train_step.py --device cuda: ResNet-50-GN, ConvNeXt-T, ViT-S, eager and
#                compiled, bf16, channels_last, batch 64 at 224.
#   small_batch  issue 20 (d): the Figure-1 network (docs/study/figure1.yaml) at batch 1, 2, 4, 64,
#                GN / ILM+GN / GN+PN training steps interleaved, fp32, eager against
#                torch.compile(mode="reduce-overhead") (CUDA graphs): the per-layer small (B, C)
#                operations are kernel launches on CUDA, which the graphs replay in one launch.
#   small_kernel issue 20 (d): benchmarks/ilm_layer_profile.py --device cuda: one ILM+GN layer's
#                fwd+bwd at the Figure-1 shapes, batch 1, 2, 4, Triton with the fused (B, C)
#                kernels (ilmconvert/nn/triton_small.py: one launch each way) against Triton with the
#                PyTorch (B, C) code, the PyTorch fast path and nn.GroupNorm: checked against the
#                float64 CPU reference first, then µs per fwd+bwd and GPU activities (torch.profiler);
#                then the Figure-1 network's eager steps at batch 1, 2, 4 with ILMCONVERT_TRITON_SMALL=0
#                (compare with small_batch's eager rows, which run the fused kernels).
#   cifar10      the bundled cifar10 recipe for CIFAR10_EPOCHS epochs (default 10) on the real data.
#   torchrun     torchrun --nproc_per_node 1 (NCCL) of the cifar10-smoke recipe.
#
# The cifar10 stages need the data as .data/cifar10-jpeg.tgz (git-ignored; copy it from
# ../shared/data and name .data in the device tool's carry). The device image lacks pydantic:
# download its wheels here into .whl (see /work/.library/device/README.md; pydantic, pydantic-core,
# annotated-types, typing-inspection for Python 3.12) and carry .whl. Then, for example:
#
#   bash benchmarks/gpu_suite.sh $OUT correctness layers
set -euo pipefail
OUT=${1:?usage: bash benchmarks/gpu_suite.sh OUT [STAGE ...]}
shift
STAGES=${*:-correctness layers train_step small_batch small_kernel cifar10 torchrun}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
$PY - > "$OUT/environment.json" <<'EOF'
import json, platform, torch, triton, timm, torchvision
print(json.dumps({
    "device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
    "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
    "timm": timm.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
}, indent=1))
EOF

cifar10() {
  if [ ! -d /tmp/cifar10 ]; then
    tar xzf .data/cifar10-jpeg.tgz -C /tmp
  fi
}

for stage in $STAGES; do
  echo "== $stage" | tee -a "$OUT/suite.log"
  start=$(date +%s)
  case $stage in
    correctness)
      $PY benchmarks/gpu_correctness.py --out "$OUT/correctness.json" 2>&1 | tee "$OUT/correctness.log" | tail -3
      ;;
    layers)
      $PY benchmarks/layers.py --device cuda --proxy --out "$OUT/layers_cuda.json" > "$OUT/layers.log" 2>&1
      tail -30 "$OUT/layers.log"
      ;;
    train_step)
      $PY benchmarks/train_step.py --device cuda --out "$OUT/train_step_cuda.json" > "$OUT/train_step.log" 2>&1
      tail -15 "$OUT/train_step.log"
      ;;
    small_batch)
      $PY benchmarks/train_step.py --device cuda --models figure1 --batch-sizes 1,2,4,64 \
        --compile eager,reduce-overhead --steps 30 --warmup 10 --out "$OUT/train_step_figure1_cuda.json" \
        > "$OUT/small_batch.log" 2>&1
      tail -12 "$OUT/small_batch.log"
      ;;
    small_kernel)
      $PY benchmarks/ilm_layer_profile.py --device cuda --batch-sizes 1,2,4 --repeats 200 \
        --out "$OUT/ilm_small_kernel_cuda.json" > "$OUT/small_kernel.log" 2>&1 || { tail -20 "$OUT/small_kernel.log"; exit 1; }
      grep '^|' "$OUT/small_kernel.log" | tail -17
      # the network without the fused kernels, eager (small_batch's eager rows are the network with them)
      ILMCONVERT_TRITON_SMALL=0 $PY benchmarks/train_step.py --device cuda --models figure1 --batch-sizes 1,2,4 \
        --compile eager --steps 30 --warmup 10 --out "$OUT/train_step_figure1_cuda_unfused.json" \
        > "$OUT/small_kernel_network.log" 2>&1
      tail -6 "$OUT/small_kernel_network.log"
      ;;
    cifar10)
      cifar10
      $PY -m ilmconvert finetune --recipe cifar10 --data /tmp/cifar10 --device cuda --out /tmp/run_cifar10 \
        --set "train.epochs=${CIFAR10_EPOCHS:-10}" > "$OUT/cifar10.log" 2>&1
      cp /tmp/run_cifar10/metrics.jsonl "$OUT/cifar10_metrics.jsonl"
      tail -5 "$OUT/cifar10.log"
      ;;
    torchrun)
      cifar10
      torchrun --nproc_per_node 1 -m ilmconvert finetune --recipe cifar10-smoke --data /tmp/cifar10 \
        --device cuda --out /tmp/run_torchrun > "$OUT/torchrun.log" 2>&1
      tail -5 "$OUT/torchrun.log"
      ;;
    *)
      echo "unknown stage $stage (correctness layers train_step small_batch small_kernel cifar10 torchrun)" >&2
      exit 2
      ;;
  esac
  echo "$stage: $(( $(date +%s) - start )) s" | tee -a "$OUT/suite.log"
done
