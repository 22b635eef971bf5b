#!/usr/bin/env bash
# Gathers, on this (Debian bookworm, LLVM) machine, what a GPU machine lacks to build and check
# cmaec, into ONE git-ignored folder, .gpu/ at the repository root (the device tool carries it:
# carry [".gpu"]); tests/gpu/run.sh reads it there. The GPU machines have the CUDA toolkit,
# CMake, gcc and Python, but no LLVM, no cJSON, no network (and maybe no zlib/libpng/libjpeg
# headers), so the folder holds:
#   deps/     cJSON (header + its shared library, which needs only glibc 2.14), zlib, libpng,
#             libjpeg and SQLite (the tuning database; headers + static libraries), unpacked
#             from Debian packages;
#   fashion-mnist/   the four IDX files (gzip), for $CMAEC_FMNIST_DIR;
#   cpu/      the CPU backend's 50-step training run of cmae_vit_tiny_fmnist (metrics.jsonl),
#             the reference run.sh compares the CUDA run against (no CPU backend there).
# Usage: bash tests/gpu/prepare.sh [--no-cpu-run]   (builds build/ with LLVM if needed; the CPU
# run takes about 12 minutes on 2 cores: --no-cpu-run keeps .gpu/cpu from an earlier run)
# The folder must stay under 64 MiB (the device tool's limit on what travels): checked last.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=$root/.gpu
cpu_run=1
[ "${1:-}" = "--no-cpu-run" ] && cpu_run=0
# The CPU reference run and run.sh's CUDA run use these same flags (run.sh reads them from here).
train_steps=50
train_seed=7
limit_mib=64

mkdir -p "$out/deps" "$out/debs" "$out/fashion-mnist"

# ---- Debian packages: from apt's cache when there, else downloaded with apt-get ----------
packages=(libcjson-dev libcjson1 zlib1g-dev libpng-dev libjpeg62-turbo-dev libsqlite3-dev)
for p in "${packages[@]}"; do
  deb=$(ls /var/cache/apt/archives/"${p}"_*_amd64.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    deb=$(ls "$out/debs/${p}"_*_amd64.deb 2>/dev/null | head -1 || true)
  fi
  if [ -z "$deb" ]; then
    (cd "$out/debs" && apt-get download "$p" >/dev/null 2>&1) || {
      echo "prepare: cannot get the Debian package $p (apt-get download failed)" >&2
      exit 1
    }
    deb=$(ls "$out/debs/${p}"_*_amd64.deb | head -1)
  fi
  dpkg -x "$deb" "$out/deps"
done
rm -rf "$out/debs"
# The files run.sh names, in one include dir and one lib dir.
inc=$out/deps/usr/include
lib=$out/deps/usr/lib/x86_64-linux-gnu
cp -f "$inc/x86_64-linux-gnu/jconfig.h" "$inc/jconfig.h"
rm -rf "$out/deps/usr/share"
for f in "$inc/cjson/cJSON.h" "$inc/zlib.h" "$inc/png.h" "$inc/jpeglib.h" "$inc/sqlite3.h" \
         "$lib/libz.a" "$lib/libpng16.a" "$lib/libjpeg.a" "$lib/libsqlite3.a" \
         "$lib/libcjson.so.1"; do
  [ -e "$f" ] || { echo "prepare: $f missing after unpacking" >&2; exit 1; }
done

# ---- Fashion-MNIST ------------------------------------------------------------------------
fm=${CMAEC_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz \
         t10k-labels-idx1-ubyte.gz; do
  [ -f "$fm/$f" ] || { echo "prepare: $fm/$f missing (apt-get install dataset-fashion-mnist)" >&2; exit 1; }
  cp -f "$fm/$f" "$out/fashion-mnist/$f"
done

# ---- the CPU backend's losses ----------------------------------------------------------------
printf 'steps=%s\nseed=%s\n' "$train_steps" "$train_seed" >"$out/train.env"
if [ "$cpu_run" = 1 ]; then
  [ -x build/cmaec ] || bash scripts/build.sh --only cmaec
  rm -rf "$out/cpu"
  t0=$(date +%s)
  CMAEC_FMNIST_DIR=$out/fashion-mnist build/cmaec train models/cmae_vit_tiny_fmnist.json \
    --backend cpu --steps "$train_steps" --seed "$train_seed" --out "$out/cpu" >"$out/cpu.log" 2>&1 || { cat "$out/cpu.log" >&2; exit 1; }
  rm -f "$out/cpu"/ckpt-* "$out/cpu/latest" # only the losses travel
  mv "$out/cpu.log" "$out/cpu/train.log"
  echo "prepare: CPU reference run: $train_steps steps in $(($(date +%s) - t0)) s"
fi

# What travels: the working tree (tracked and untracked-not-ignored files) and the folder.
size_b=$(du -sb "$out" | cut -f1)
tree_b=$( (git ls-files -z; git ls-files -z -o --exclude-standard) | xargs -0 -r du -cb 2>/dev/null |
  awk '$2 == "total" { t += $1 } END { print t + 0 }')
awk -v d="$out" -v b="$size_b" -v t="$tree_b" -v l="$limit_mib" 'BEGIN {
  printf "prepare: %s holds %.1f MiB; with the working tree (%.1f MiB) %.1f MiB travel (limit %d MiB)\n",
         d, b / 1048576, t / 1048576, (b + t) / 1048576, l }'
if [ $((size_b + tree_b)) -ge $((limit_mib * 1048576)) ]; then
  echo "prepare: $out and the working tree are over the $limit_mib MiB the device tool carries" >&2
  exit 1
fi
