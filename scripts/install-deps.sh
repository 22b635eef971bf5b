#!/usr/bin/env bash
# Installs what cmaec needs on Debian 12 (bookworm): only what is missing.
set -euo pipefail

packages=(cmake make gcc g++ llvm-19-dev clang-19 libclang-rt-19-dev libomp-19-dev libcjson-dev zlib1g-dev
          libpng-dev libjpeg62-turbo-dev dataset-fashion-mnist clang-format python3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install-deps: installing ${missing[*]}"
  sudo_cmd=()
  if [[ $(id -u) -ne 0 ]]; then sudo_cmd=(sudo); fi
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# Python packages for the reference tests (independent implementations: the
# safetensors reference library, and JAX on the CPU for the CMAE losses and gradients).
if ! python3 -c 'import numpy, safetensors, jax' 2>/dev/null; then
  echo "install-deps: pip install numpy safetensors jax"
  python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 numpy safetensors jax ||
    python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 --break-system-packages numpy safetensors jax
fi

# CPU-only PyTorch for the encoder export test (tests/reference/export_torch.py
# loads the exported file into a PyTorch ViT with strict key matching).
if ! python3 -c 'import torch' 2>/dev/null; then
  echo "install-deps: pip install torch (CPU)"
  torch_index=(--index-url https://download.pytorch.org/whl/cpu)
  # Not fatal: without torch the test runs the same ViT in numpy (set
  # CMAEC_REQUIRE_TORCH=1 to make the test insist on torch).
  python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 "${torch_index[@]}" torch ||
    python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 --break-system-packages "${torch_index[@]}" torch ||
    echo "install-deps: warning: could not install torch; export_torch.py falls back to numpy" >&2
fi
