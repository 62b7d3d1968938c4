#!/usr/bin/env bash
# Everything that needs a GPU, in one script, bounded in time, results in one folder.
#
#   bash bench/gpu_check.sh [--dry-run] [--parts LIST] [--budget SECONDS]
#
# Output: $OUT if set (the device runner's return folder), else ./gpu_results — one log per part,
# JSON from the benches, a copy of bench/RESULTS.md with the appended GPU entries, and SUMMARY.md
# (part, exit status, seconds, log) written after every part, so a cut-short run still has one.
#
# Parts, in this order (LIST is a comma-separated subset; default: all):
#   env        nvidia-smi, versions, free memory, nsys/ncu presence
#   tests      every GPU test of the suite (IGDS_TEST_GPU=1; selection: gpu marker or a CUDA/GPU
#              skipif reason, igds_fast.profiling.pytest_gpu_select), fidelity included
#   selfcheck  bench/self_check.py: the compiled backend's first-step errors per part (digits prior
#              architecture, adm256 + ResNet-50; bf16 and fp16, compiled, mode "default")
#   adm256     bench/sampler.py adm256, batch 32: eager fp32, eager fp16, compiled, compiled+graphs
#              with mode "default" and no autotuning flags (the shortest compile) and the fidelity check
#   adm256-ma  the same compiled/graphs rows with the CompileConfig defaults (max-autotune-no-cudagraphs
#              + CONV_UNET_INDUCTOR_OPTIONS: long compile, Triton autotuning of every kernel)
#   adm64      bench/sampler.py adm64, batch 64, all variants, mode "default", no flags (the graphs
#              >= 2x compiled target; graphs remove launch overhead whatever the mode)
#   kernels    bench/kernels.py at the real sizes (a failing case is a FAILED row, the rest still run)
#   nsys       profiling/nsys.sh on adm256 compiled+graphs if nsys is on PATH; else (the GPU machines
#              have no working nsys) a torch.profiler trace of the same run, batch 32 as the adm256 part
#   flags      adm64 compiled/graphs, mode "default" WITH CONV_UNET_INDUCTOR_OPTIONS: against the adm64
#              part, what the flags buy (and what they cost in compile time)
#   dit256     bench/sampler.py dit-xl2-256 (DiT-XL/2 under CFG + SD's VAE decoder + ResNet-50), batch 16:
#              all variants guided and unguided, mode "default", no flags, the fidelity check; no target
#              of its own (s/image at 50 steps, the decoder's share of a guided step). Needs diffusers,
#              which the GPU image lacks: carry its wheel (and importlib_metadata's) as the device
#              runner's README says, else the part is skipped
#
# Every part has its own timeout and the whole run a budget (default 1440 s = 24 min; a part starts
# only with >= 60 s left and is cut at the budget). The device runner limits ONE command to 600 s,
# returns at most 8 files (16 MiB each) from $OUT, and a session has 30 min of device time with the
# machine's start (1-2 min) counted in — so at most three calls of three parts or fewer, the targets
# first (a part cut by its timeout keeps its per-variant "[bench]" lines in its log):
#   bash bench/gpu_check.sh --parts env,tests,kernels --budget 520    # GPU tests + fidelity, kernel table
#   bash bench/gpu_check.sh --parts adm256,nsys --budget 520          # the s/image, 8x and 2x targets; a trace
#   bash bench/gpu_check.sh --parts adm64,flags --budget 400          # graphs >= 2x compiled; flags A/B
# (24 min of commands + a 1-2 min start inside the 30 min), and in a later session: --parts adm256-ma;
# the latent prior in a call of its own: --parts dit256 --budget 520 (diffusers carried, see above).
# Send each call as soon as the last returns: an idle machine is given back after 30 s, and with it
# the inductor cache in /tmp.
# torch.compile's caches go to $TORCHINDUCTOR_CACHE_DIR (default /tmp/igds_inductor_cache), shared by
# all parts: a later part recompiling the same graph hits the FX-graph and autotuning caches.
#
# --dry-run (any machine, no GPU needed): syntax-checks the scripts, prints the plan with the exact
# commands and timeouts, and writes the SUMMARY.md skeleton — nothing heavy runs.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
PARTS="env,tests,selfcheck,adm256,adm256-ma,adm64,kernels,nsys,flags,dit256"
BUDGET_S=1440
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --parts) PARTS="$2"; shift ;;
    --budget) BUDGET_S="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

RESULTS_DIR="${OUT:-./gpu_results}"
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
SUMMARY="$RESULTS_DIR/SUMMARY.md"
# The checkout itself, installed or not: the GPU machines have no network for pip, and an uninstalled
# checkout maps kernels/ and profiling/ into igds_fast by itself (igds_fast/__init__.py).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The GPU machines' interpreter is python3 (/opt/torch/.venv/bin/python3); `python` may not exist.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHON="$PY"
if ! "$PY" -c "import igds_fast.kernels, igds_fast.profiling, igds_fast.sampling.compiled.step" 2>"$RESULTS_DIR/import_error.log"; then
  echo "gpu_check.sh: igds_fast does not import from $PWD:" >&2
  tail -n 5 "$RESULTS_DIR/import_error.log" >&2
  exit 1
fi
rm -f "$RESULTS_DIR/import_error.log"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/igds_inductor_cache}"
export PYTHONUNBUFFERED=1
START_S=$(date +%s)
STATUS_ROWS=()

{
  echo "# GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- host: $(hostname), parts: $PARTS, budget: ${BUDGET_S} s, dry run: $DRY_RUN"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
} > "$SUMMARY.head"

write_summary() {
  {
    cat "$SUMMARY.head"
    echo
    echo "| part | status | exit | seconds | log |"
    echo "|---|---|---:|---:|---|"
    printf '%s\n' "${STATUS_ROWS[@]}"
  } > "$SUMMARY"
}

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

# run_part NAME TIMEOUT_S COMMAND... : run with a timeout bounded by the remaining budget, log to NAME.log.
run_part() {
  local name="$1" limit="$2"; shift 2
  local log="$RESULTS_DIR/$name.log"
  local elapsed=$(( $(date +%s) - START_S ))
  local left=$(( BUDGET_S - elapsed - 10 ))
  if (( DRY_RUN )); then
    echo "[plan] $name (timeout ${limit} s): $*"
    STATUS_ROWS+=("| $name | planned (dry run) | - | - | $name.log |")
    write_summary
    return 0
  fi
  if (( left < 60 )); then
    echo "[skip] $name: ${left} s of the budget left"
    STATUS_ROWS+=("| $name | skipped: budget | - | - | - |")
    write_summary
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "[run ] $name (timeout ${limit} s): $*"
  local t0=$(date +%s)
  { echo "\$ $*"; echo; } > "$log"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local seconds=$(( $(date +%s) - t0 ))
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAILED"; fi
  echo "[done] $name: $status (exit $rc, ${seconds} s)"
  tail -n 5 "$log" | sed 's/^/       /'
  STATUS_ROWS+=("| $name | $status | $rc | $seconds | $name.log |")
  write_summary
}

if (( DRY_RUN )); then
  for script in bench/gpu_check.sh profiling/nsys.sh profiling/ncu.sh; do
    bash -n "$script" || { echo "syntax error in $script" >&2; exit 1; }
  done
  "$PY" -m py_compile bench/sampler.py bench/model_stats.py bench/kernels.py bench/self_check.py \
    profiling/torch_trace.py || exit 1
  echo "[dry ] scripts parse"
fi

SAMPLER=("$PY" bench/sampler.py --warmup 3 --steps 5)
# Bounded compile for the parts that are not about the inductor flags (see the header).
SHORT_COMPILE='{"mode": "default", "inductor_options": {}}'
# pytest-timeout (on the GPU machines' image) bounds each test, so one hang cannot eat the part.
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=240)

wanted env && run_part env 60 bash -c '
  nvidia-smi || true
  "$PYTHON" -c "import torch, triton, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"python\", platform.python_version()); print(torch.cuda.get_device_name(), torch.cuda.mem_get_info())"
  "$PYTHON" -c "import xformers; print(\"xformers\", xformers.__version__)" 2>/dev/null || echo "xformers: not installed"
  "$PYTHON" -c "import diffusers; print(\"diffusers\", diffusers.__version__)" 2>/dev/null || echo "diffusers: not installed"
  command -v nsys && nsys --version || echo "nsys: not found"
  command -v ncu && ncu --version || echo "ncu: not found"
  nproc; free -g'

# -v: one line per test as it ends, so a part cut by its timeout still shows what passed and failed.
wanted tests && run_part tests 420 env IGDS_TEST_GPU=1 "$PY" -m pytest -v -rs --durations=15 "${PYTEST_TIMEOUT[@]}" \
  -p igds_fast.profiling.pytest_gpu_select --junitxml="$RESULTS_DIR/gpu_tests.xml" tests

# The compiled backend's first-step self-check errors (bench/self_check.py): the digits prior's
# architecture and adm256 + ResNet-50, compiled in bf16 and fp16.
wanted selfcheck && run_part selfcheck 300 "$PY" bench/self_check.py --models digits,adm256 --dtypes bf16,fp16 \
  --compile --compile-options "$SHORT_COMPILE"

wanted adm256 && run_part adm256 480 "${SAMPLER[@]}" --presets adm256 --batch-sizes 32 \
  --compile-options "$SHORT_COMPILE" --check-fidelity \
  --json "$RESULTS_DIR/sampler_adm256_default.json" --append-results

wanted adm256-ma && run_part adm256-ma 540 "${SAMPLER[@]}" --presets adm256 --batch-sizes 32 \
  --variants compiled,graphs --check-fidelity \
  --json "$RESULTS_DIR/sampler_adm256_max_autotune.json" --append-results

wanted adm64 && run_part adm64 360 "${SAMPLER[@]}" --presets adm64 --batch-sizes 64 \
  --compile-options "$SHORT_COMPILE" --check-fidelity --json "$RESULTS_DIR/sampler_adm64.json" --append-results

wanted kernels && run_part kernels 240 "$PY" bench/kernels.py --append-results

if wanted nsys; then
  if command -v nsys >/dev/null 2>&1 || (( DRY_RUN )); then
    run_part nsys 300 bash profiling/nsys.sh "$RESULTS_DIR/nsys_adm256_graphs" -- \
      "$PY" bench/sampler.py --presets adm256 --batch-sizes 32 --variants graphs --profile graphs \
      --compile-options "$SHORT_COMPILE" --warmup 2 --steps 3
  else
    # Same shapes and options as the adm256 part: right after it, the inductor caches are warm.
    run_part torch_trace 300 "$PY" profiling/torch_trace.py --preset adm256 --batch-size 32 \
      --compile-options "$SHORT_COMPILE" --out "$RESULTS_DIR/torch_trace_adm256"
  fi
fi

# A/B of the inductor flags at equal mode: the adm64 part ran mode "default" WITHOUT the flags.
wanted flags && run_part flags 300 "${SAMPLER[@]}" --presets adm64 --batch-sizes 64 --variants compiled,graphs \
  --compile-options '{"mode": "default"}' --json "$RESULTS_DIR/sampler_adm64_conv_flags.json"

# The latent prior (the dit256 part in the header): after the ADM targets, in a call of its own.
if wanted dit256; then
  if (( DRY_RUN )) || "$PY" -c "import diffusers" 2>/dev/null; then
    run_part dit256 480 "${SAMPLER[@]}" --presets dit-xl2-256 --batch-sizes 16 \
      --compile-options "$SHORT_COMPILE" --check-fidelity --json "$RESULTS_DIR/sampler_dit256.json" --append-results
  else
    echo "[skip] dit256: diffusers is not importable (carry its wheel)"
    STATUS_ROWS+=("| dit256 | skipped: no diffusers | - | - | - |")
    write_summary
  fi
fi

if (( ! DRY_RUN )); then
  cp bench/RESULTS.md "$RESULTS_DIR/RESULTS.md" 2>/dev/null || true
fi
write_summary
rm -f "$SUMMARY.head"
echo "summary: $SUMMARY"
cat "$SUMMARY"
