#!/usr/bin/env bash
# Nsight Compute metrics of the igds_fast Triton kernels (x0 / fused update / guidance head / Philox
# / preprocess), at the GPU's own clocks.
#
#   profiling/ncu.sh [OUTPUT_BASENAME] [-- COMMAND ...]
#
# Default: one ncu pass per kernel, each over `bench/kernels.py --only CASES` (the bench cases that
# launch that kernel), so every kernel is profiled — a single pass with --launch-count N would spend
# all N launches on whichever kernel the bench runs first. Each pass skips the first IGDS_NCU_SKIP
# launches of its kernel (warm-up, first-call compile) and profiles IGDS_NCU_COUNT (default 2) with the
# IGDS_NCU_SET section set ("full" by default; "basic" is quicker). Writes OUTPUT_<kernel>.ncu-rep and
# OUTPUT_<kernel>.csv (the details page).
# With a COMMAND, or IGDS_NCU_KERNELS (a regex), one pass over that command/regex instead:
# OUTPUT.ncu-rep and OUTPUT.csv.
# --clock-control none: measure at the clocks the GPU really runs (ncu locks base clocks by default,
# which understates bandwidth-bound kernels against bench numbers). Kernels inside CUDA graphs are
# profiled per node (--graph-profiling node).
set -euo pipefail
out="${1:-igds_ncu}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if ! command -v ncu >/dev/null 2>&1; then
  echo "ncu.sh: ncu (Nsight Compute) is not on PATH" >&2
  exit 127
fi

profile() {  # profile OUTPUT KERNEL_FILTER COMMAND...
  local output="$1" filter="$2"; shift 2
  ncu \
    --clock-control none \
    --target-processes all \
    --graph-profiling node \
    --kernel-name "$filter" \
    --launch-skip "${IGDS_NCU_SKIP:-3}" \
    --launch-count "${IGDS_NCU_COUNT:-2}" \
    --set "${IGDS_NCU_SET:-full}" \
    --import-source yes \
    --force-overwrite \
    --export "$output" \
    "$@"
  ncu --import "$output.ncu-rep" --page details --csv > "$output.csv" || echo "ncu.sh: csv export failed for $output" >&2
}

if [[ $# -gt 0 || -n "${IGDS_NCU_KERNELS:-}" ]]; then
  [[ $# -eq 0 ]] && set -- "$PY" bench/kernels.py
  profile "$out" "${IGDS_NCU_KERNELS:-regex:_ddpm_update_kernel|_predict_x0_kernel|_head_(phase1|rows|grad)_kernel|_philox_normal_kernel|_preprocess_(fwd|bwd)_kernel}" "$@"
  ls -1 "$out".* 2>/dev/null
  exit 0
fi

# kernel name -> the bench/kernels.py cases (--only regex) that launch it
KERNELS=(
  "_predict_x0_kernel:^predict_x0"
  "_ddpm_update_kernel:^fused_ddpm_update"
  "_philox_normal_kernel:^philox_normal"
  "_head_phase1_kernel:^guidance_head \\(ieee"
  "_head_rows_kernel:^guidance_head \\(ieee"
  "_head_grad_kernel:^guidance_head \\(ieee"
  "_preprocess_fwd_kernel:^preprocess forward"
  "_preprocess_bwd_kernel:^preprocess backward"
)
failed=0
for entry in "${KERNELS[@]}"; do
  kernel="${entry%%:*}" cases="${entry#*:}"
  echo "ncu.sh: $kernel (bench cases: $cases)" >&2
  profile "${out}_${kernel#_}" "regex:^${kernel}\$" "$PY" bench/kernels.py --only "$cases" || failed=$((failed + 1))
done
ls -1 "${out}"_* 2>/dev/null
exit $(( failed > 0 ))
