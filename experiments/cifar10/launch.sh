#!/usr/bin/env bash
# Reproduces DDPM (Ho et al. 2020) and a class-conditional DiT-S/2 on CIFAR-10, then scores both.
# See README.md in this folder for the expected numbers and the cost.
#
#   bash experiments/cifar10/launch.sh ddpm   RUNS_DIR     # one GPU node or a TPU VM
#   bash experiments/cifar10/launch.sh dit    RUNS_DIR
#   bash experiments/cifar10/launch.sh score  RUNS_DIR     # FID/KID of both (50k samples each)
#
# Multi-host TPU pods: run the same line on every host with EXTRA="--distributed"
#   (gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd jaxdiff && EXTRA=--distributed bash experiments/cifar10/launch.sh ddpm gs://BUCKET/runs")
# Re-running the same command resumes from the latest checkpoint.
set -euo pipefail

what="${1:?ddpm | dit | score}"
runs="${2:-runs}"
python="${PYTHON:-python}"
extra="${EXTRA:-}"

case "$what" in
  ddpm)
    # 800k steps, batch 128, Adam 2e-4 (5k warmup), dropout 0.1, flips, EMA 0.9999.
    $python -m jaxdiff.train --config=configs/cifar_unet.py --workdir="$runs/cifar10_ddpm" $extra
    ;;
  dit)
    # Class-conditional DiT-S/2, label dropout 0.1, 400k steps, batch 128, AdamW 1e-4, EMA 0.9999.
    # bfloat16 compute (float32 params, EMA and moments); drop the override for float32.
    $python -m jaxdiff.train --config=configs/cifar_dit.py --workdir="$runs/cifar10_dit_s2" \
      --config.model.dtype=bfloat16 $extra
    ;;
  score)
    # DDPM's protocol: 50k samples, 1000 ancestral steps. DiT: DDPM-style 250 steps as in the
    # DiT paper, and guidance scale 1.5 as in configs/cifar_dit.py.
    $python -m jaxdiff.sample --workdir="$runs/cifar10_ddpm" --method=ddpm --num_steps=1000 \
      --num_samples=50000 --batch_size=1000 --seed=0 --out="$runs/cifar10_ddpm/fid"
    $python -m jaxdiff.sample --workdir="$runs/cifar10_dit_s2" --method=ddpm --num_steps=250 \
      --guidance_scale=1.5 --num_samples=50000 --batch_size=1000 --seed=0 \
      --out="$runs/cifar10_dit_s2/fid"
    for run in cifar10_ddpm cifar10_dit_s2; do
      for samples in "$runs/$run"/fid/samples_*.npz; do
        $python -m jaxdiff.evaluate --samples="$samples" --dataset=cifar10 --split=train
      done
    done
    ;;
  *)
    echo "usage: $0 ddpm|dit|score [RUNS_DIR]" >&2
    exit 2
    ;;
esac
