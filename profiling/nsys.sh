#!/usr/bin/env bash
# Nsight Systems timeline of the measured window only (cudaProfilerStart/Stop), CUDA graphs per node.
#
#   profiling/nsys.sh [OUTPUT_BASENAME] [-- COMMAND ...]
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
