#!/usr/bin/env bash
# A/B of a kernel patch on a GPU machine, from the repository root:
#   bash scripts/experiments/decode_ab.sh PATCH [rounds]   (PATCH: a diff of plugins/csrc, applied with patch -p1)
# Builds the library as checked out (old) and with the patch applied to a copy (new), for this GPU's
# architecture (needs patch(1)), then times scripts/experiments/decode_shapes.py with each in alternating processes.
set -euo pipefail
patch_file=$(realpath "$1")
rounds=${2:-3}
arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
rm -rf /tmp/ab-new && mkdir -p /tmp/ab-new && cp -r CMakeLists.txt plugins pyproject.toml /tmp/ab-new/
(cd /tmp/ab-new && patch -s -p1 < "$patch_file")
for side in old new; do
  src=.; [ "$side" = new ] && src=/tmp/ab-new
  cmake -S "$src" -B "/tmp/ab-$side-build" -DEET_CUDA_ARCHITECTURES="$arch" -DCMAKE_BUILD_TYPE=Release > /dev/null
  cmake --build "/tmp/ab-$side-build" -j "$(( $(nproc) / 2 ))" > "/tmp/ab-$side-build.log" 2>&1 &
done
wait
ls /tmp/ab-old-build/libeet_kernels.so /tmp/ab-new-build/libeet_kernels.so > /dev/null  # both builds succeeded
for i in $(seq "$rounds"); do
  for side in old new; do
    EET_KERNELS_LIB="/tmp/ab-$side-build/libeet_kernels.so" python3 scripts/experiments/decode_shapes.py "$side$i"
  done
done | sort -k2,2 -k1,1
