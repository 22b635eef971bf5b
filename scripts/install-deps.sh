#!/usr/bin/env bash
# Installs what cmaec needs on Debian 12 (bookworm): only what is missing.
set -euo pipefail

packages=(cmake make gcc g++ llvm-19-dev clang-19 libclang-rt-19-dev libomp-19-dev libcjson-dev zlib1g-dev
          libpng-dev libjpeg62-turbo-dev libsqlite3-dev dataset-fashion-mnist clang-format python3
          openmpi-bin libopenmpi-dev)
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

# cuobjdump for the SASS check (tests/unit/test_sass.c, which finds it through the package's
# metadata): the CUDA toolkit here has NVRTC and ptxas but not cuobjdump, nor the nvdisasm that
# cuobjdump -sass runs; both come from the Python package index (bin/ inside the package).
cuda_tools=(nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)
if ! python3 -c 'import importlib.metadata as m; [m.distribution(p) for p in ("nvidia-cuda-cuobjdump", "nvidia-cuda-nvdisasm")]' 2>/dev/null; then
  echo "install-deps: pip install ${cuda_tools[*]}"
  python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 "${cuda_tools[@]}" ||
    python3 -m pip install --quiet --disable-pip-version-check --retries 1 --timeout 15 --break-system-packages "${cuda_tools[@]}"
fi

# PyTorch and timm for the encoder interop test (tests/cli/export_torch.sh loads the
# exported encoder into timm's VisionTransformer with strict keys). From the default
# index, pinned so the timm names and constructor stay as tested. PyPI has no CPU-only
# torch for Linux: torch pulls the CUDA libraries it links against (about 3 GB of wheels,
# 5.4 GB installed, 2.5 min on the reference machine). A failed install fails this script.
torch_pkgs=(torch==2.15.0 torchvision==0.29.2 timm==1.0.31)
if ! python3 -c 'import torch, timm; from timm.models.vision_transformer import VisionTransformer' 2>/dev/null; then
  echo "install-deps: pip install ${torch_pkgs[*]} (about 3 GB of wheels)"
  pip_torch=(python3 -m pip install --quiet --disable-pip-version-check --progress-bar off --retries 3 --timeout 60)
  if ! "${pip_torch[@]}" "${torch_pkgs[@]}"; then
    "${pip_torch[@]}" --break-system-packages "${torch_pkgs[@]}" || {
      echo "install-deps: error: could not install ${torch_pkgs[*]} (the interop test needs them)" >&2
      exit 1
    }
  fi
  python3 -c 'import torch, timm; from timm.models.vision_transformer import VisionTransformer' || {
    echo "install-deps: error: torch and timm were installed but do not import" >&2
    exit 1
  }
fi
