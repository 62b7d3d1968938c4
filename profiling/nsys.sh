#!/usr/bin/env bash
# Nsight Systems timeline of the measured window only (cudaProfilerStart/Stop), CUDA graphs per node.
#
#   profiling/nsys.sh [OUTPUT_BASENAME] [-- COMMAND ...]
#
# A real run: IGDS_PROFILE_STEPS=A:B opens the window around sampling-loop steps A .. B-1 (0 = the
# first step from noise, B excluded) of the run's first batch (igds_fast/profiling/window.py), e.g.
#
#   IGDS_PROFILE_STEPS=20:30 bash profiling/nsys.sh adm256_run -- \
#       igds-fast distill --prior 256x256_diffusion.pt --preset adm256-cond --ve ve.safetensors \
#       --classes imagewoof --ipc 10 --out out/woof --backend compiled
#
# (or `igds-fast distill ... --profile-steps 20:30`). Pick A past the first steps when they compile,
# autotune or capture graphs (the compiled backend's first batch), so the report shows the steady
# state; every step is an NVTX range igds/step/<k>, k the same loop index. Without a window nothing
# calls cudaProfilerStart and the report stays empty: the script says so before it starts.
#
# Default command: bench/sampler.py, adm256, the compiled+graphs variant, batch 16; the bench calls
# torch.cuda.profiler.start()/stop() around its timed steps only (--profile VARIANT), so warm-up,
# torch.compile, autotuning and graph capture stay out of the report. --cuda-graph-trace=node shows
# every kernel inside each graph replay (the default, graph, shows one block per replay).
# Per-phase NVTX ranges (igds/unet, igds/guidance, igds/update) are host ranges: in graph mode they
# are recorded at capture time, not replay, so profile the "compiled" variant (no graphs) to see the
# phases, and the "graphs" variant for the replay timeline (igds/graph/replay around each replay).
# Writes OUTPUT.nsys-rep and text summaries OUTPUT_*.csv (kernels, NVTX ranges, CUDA API).
set -euo pipefail
out="${1:-igds_nsys}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift
PY="${PYTHON:-$(command -v python3 || command -v python)}"
if [[ $# -eq 0 ]]; then
  set -- "$PY" bench/sampler.py --presets adm256 --batch-sizes 16 --variants graphs --profile graphs \
    --warmup 3 --steps 5
elif [[ -z "${IGDS_PROFILE_STEPS:-}" && " $* " != *" --profile-steps"* && " $* " != *" --profile "* ]]; then
  echo "nsys.sh: neither IGDS_PROFILE_STEPS=A:B nor --profile-steps A:B is set: unless the command calls" \
    "cudaProfilerStart itself, nothing will be captured" >&2
fi
if ! command -v nsys >/dev/null 2>&1; then
  echo "nsys.sh: nsys (Nsight Systems) is not on PATH; use profiling/torch_trace.py instead" >&2
  exit 127
fi
nsys profile \
  --capture-range=cudaProfilerApi --capture-range-end=stop \
  --cuda-graph-trace=node \
  --trace=cuda,nvtx,cublas,cudnn,osrt \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true \
  --output="$out" \
  "$@"
# Report names changed across nsys versions (cuda_gpu_kern_sum / gpukernsum): try both.
for report in cuda_gpu_kern_sum nvtx_sum cuda_api_sum; do
  nsys stats --force-export=true --report "$report" --format csv --output "$out" "$out.nsys-rep" >/dev/null 2>&1 \
    || nsys stats --report "${report//_/}" --format csv --output "$out" "$out.nsys-rep" >/dev/null 2>&1 \
    || echo "nsys.sh: could not export report $report" >&2
done
ls -1 "$out"* 2>/dev/null
