#!/usr/bin/env bash
# Nsight Compute metrics of the igds_fast Triton kernels (x0 / fused update / guidance head / Philox
# / preprocess), at the GPU's own clocks.
#
#   profiling/ncu.sh [OUTPUT_BASENAME] [-- COMMAND ...]          default command: python bench/kernels.py
#
# --clock-control none: measure at the clocks the GPU really runs (ncu locks base clocks by default,
# which understates bandwidth-bound kernels against bench numbers). Kernels are selected by name
# (IGDS_NCU_KERNELS, a regex), the first IGDS_NCU_SKIP matching launches (warm-up, autotuning) are
# skipped and IGDS_NCU_COUNT are profiled with the IGDS_NCU_SET section set ("full" by default; use
# "basic" for a quicker pass). Kernels inside CUDA graphs are profiled per node (--graph-profiling node).
# Writes OUTPUT.ncu-rep and OUTPUT.csv (the details page).
set -euo pipefail
out="${1:-igds_ncu}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift
[[ $# -eq 0 ]] && set -- python bench/kernels.py
if ! command -v ncu >/dev/null 2>&1; then
  echo "ncu.sh: ncu (Nsight Compute) is not on PATH" >&2
  exit 127
fi
kernels="${IGDS_NCU_KERNELS:-regex:_ddpm_update_kernel|_predict_x0_kernel|_head_(phase1|rows|grad)_kernel|_philox_normal_kernel|_preprocess_(fwd|bwd)_kernel}"
ncu \
  --clock-control none \
  --target-processes all \
  --graph-profiling node \
  --kernel-name "$kernels" \
  --launch-skip "${IGDS_NCU_SKIP:-5}" \
  --launch-count "${IGDS_NCU_COUNT:-20}" \
  --set "${IGDS_NCU_SET:-full}" \
  --import-source yes \
  --force-overwrite \
  --export "$out" \
  "$@"
ncu --import "$out.ncu-rep" --page details --csv > "$out.csv" || echo "ncu.sh: csv export failed" >&2
ls -1 "$out".* 2>/dev/null
