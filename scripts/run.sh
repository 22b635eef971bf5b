#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing, builds cmaec, pre-trains the
# default variant (models/cmae_vit_tiny_fmnist.json) on Fashion-MNIST on the CPU for a
# few minutes, then compares its frozen encoder with a randomly initialized one and with
# raw pixels (kNN and linear probe on the test split), and draws the pictures.
# Environment: CMAEC_RUN_OUT (default runs/quickstart), CMAEC_RUN_STEPS (default 400).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
bash scripts/build.sh --only cmaec
out=${CMAEC_RUN_OUT:-runs/quickstart}
steps=${CMAEC_RUN_STEPS:-400}
batch=128
rm -rf "$out" # a fresh run each time (train --resume DIR continues one instead)
# A short schedule: one epoch over steps x batch images spread over the training split,
# cosine from the start (no warmup at this length), the base lr scaled up for it.
build/cmaec train models/cmae_vit_tiny_fmnist.json --out "$out" --batch "$batch" --epochs 1 \
  --set "train.limit=$((steps * batch))" --set schedule.warmup_epochs=0 \
  --set optimizer.base_lr=1.5e-3
echo
echo "evaluating the frozen encoders (10000 train / 2000 test images of Fashion-MNIST):"
build/cmaec eval "$out" --baselines --train-limit 10000 --test-limit 2000 --batch 64 | tee "$out/eval.txt"
build/cmaec recon "$out" -o "$out/recon.png"
build/cmaec plot "$out" -o "$out/curves.png"
cat <<MSG

done. In $out/:
  metrics.jsonl   one row per step (loss_rc, loss_ct, loss, lr, momentum, images/s, step ms)
  $(cat "$out/latest")   the checkpoint (params, AdamW moments, EMA params, step, RNG, config)
  eval.txt        the table above
  recon.png       test images: view, masked input, reconstruction
  curves.png      loss and lr curves
Next: build/cmaec export $out --encoder -o encoder.safetensors (PyTorch key names),
      or a longer run: build/cmaec train models/cmae_vit_tiny_fmnist.json --epochs 10
MSG
