#!/usr/bin/env bash
# Everything that needs a GPU, sized to the device budget: one call of <= 540 s, then an optional
# second call of <= 180 s, each part's results written to SUMMARY.md the moment the part ends.
#
#   bash bench/gpu_check.sh [--dry-run] [--call 1|2] [--parts LIST] [--budget SECONDS]
#   bash bench/gpu_check.sh --fetch-wheels          # here, with pip's network: fill bench/wheels/
#
# The device budget (a session's GPU time, 15 min in all with the machine's 1-2 min start counted in;
# at most 10 min per command): call 1 = the targets first, 540 s; call 2, sent at once after call 1
# returns (an idle machine goes back after 30 s), 180 s. Every device call names `bench/wheels` in
# the device tool's `carry` (those wheels are gitignored: they do not travel otherwise).
#
# Call 1, in this order (estimates in PLAN below; every estimate is a guess until a GPU run replaces
# it with the measured seconds, which SUMMARY.md records per part):
#   env        nvidia-smi, versions, the carried wheels installed, xformers / diffusers / guided-diffusion
#   adm256     bench/sampler.py adm256, batch 32: eager fp32, eager bf16, gd-fp16 (guided-diffusion's own
#              fp16 sampler with the IGDS gradient), compiled and compiled+graphs (compile mode
#              "default", no autotuning flags: the shortest compile), 2 warm-up + 3 timed steps each,
#              the fidelity of the graph replay against eager fp32; compile and capture seconds printed
#   gputests   the GPU tests of the graph and kernel paths (IGDS_TEST_GPU=1, the gpu-marked tests of
#              test_compiled, test_fused_step and test_kernels_*)
#   digits     bench/self_check.py on the digits prior's architecture, compiled (inductor) bf16 and fp16:
#              on CPU inductor returned NaN there in bf16; this is what the GPU does
#   dit256     bench/sampler.py dit-xl2-256, batch 16, IGDS-guided: eager fp32 and the peers minimax-b1 /
#              minimax (DiT's CFG loop as MinimaxDiffusion runs it); needs diffusers (carried wheel)
# Call 2:
#   adm64      adm64 batch 64: compiled without and with graphs (the graphs >= 2x compiled target)
#   kernels    bench/kernels.py at the real sizes
# Later sessions (not in either call; each named in SUMMARY.md as not run, with its estimate):
#   dit256-compiled, adm256-ma (max-autotune), selfcheck (adm256), nsys / torch_trace, flags (A/B),
#   tests (every GPU test of the suite, not only the graph and kernel paths)
#
# --parts LIST runs those parts (plan order) instead of a call's; --budget overrides the call's
# budget. A part starts only with >= 45 s of the budget left and is cut at the budget; one that does
# not start is named in SUMMARY.md with its estimate. --dry-run (any machine, no GPU): syntax-checks
# the scripts, prints the plan with every part's estimate and command, writes the SUMMARY.md
# skeleton, and fails if call 1's estimates add up to more than 540 s (call 2's: 180 s).
#
# Output: $OUT if set (the device runner's return folder), else ./gpu_results — one log per part,
# the benches' JSON, a copy of bench/RESULTS.md with the appended GPU entries, and SUMMARY.md.
set -uo pipefail
cd "$(dirname "$0")/.."

# The device tool's limits as this plan was sized (overridable should they change).
CALL1_LIMIT_S="${IGDS_GPU_CHECK_CALL1_S:-540}"
CALL2_LIMIT_S="${IGDS_GPU_CHECK_CALL2_S:-180}"
WHEELS_DIR=bench/wheels
# name:call:estimate_s:timeout_s (call "later" = a later session). Estimates: no GPU run has timed these
# yet (compile of adm256 + ResNet-50 in mode "default" guessed at ~120 s on 16 cores); replace them
# with SUMMARY.md's measured seconds after the first run.
PLAN=(
  "env:1:20:60"
  "adm256:1:230:300"
  "gputests:1:150:200"
  "digits:1:60:120"
  "dit256:1:60:120"
  "adm64:2:110:150"
  "kernels:2:50:90"
  "dit256-compiled:later:250:400"
  "adm256-ma:later:540:540"
  "selfcheck:later:200:300"
  "nsys:later:150:300"
  "flags:later:200:300"
  "tests:later:420:420"
)

DRY_RUN=0
FETCH=0
CALL=1
PARTS=""
BUDGET_S=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --call) CALL="$2"; shift ;;
    --parts) PARTS="$2"; shift ;;
    --budget) BUDGET_S="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ "$CALL" != 1 && "$CALL" != 2 ]]; then echo "gpu_check.sh: --call must be 1 or 2, got $CALL" >&2; exit 2; fi
KNOWN=",$(printf '%s\n' "${PLAN[@]}" | cut -d: -f1 | paste -sd, -),"
for part in ${PARTS//,/ }; do
  [[ "$KNOWN" == *",$part,"* ]] || { echo "gpu_check.sh: unknown part $part (known: ${KNOWN:1:-1})" >&2; exit 2; }
done

PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHON="$PY"

if (( FETCH )); then
  # The wheels the GPU machine lacks (pure Python, or xformers' small torch>=2.10 build), pinned by
  # hash; guided-diffusion-sdk is an sdist on PyPI: built here into a wheel (pure Python).
  set -e
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --require-hashes -r "$WHEELS_DIR/requirements.txt" -d "$WHEELS_DIR"
  "$PY" -m pip wheel --no-deps --require-hashes -r "$WHEELS_DIR/requirements-sdist.txt" -w "$WHEELS_DIR"
  ls -l "$WHEELS_DIR"/*.whl
  exit 0
fi

RESULTS_DIR="${OUT:-./gpu_results}"
mkdir -p "$RESULTS_DIR"
RESULTS_DIR="$(cd "$RESULTS_DIR" && pwd)"
SUMMARY="$RESULTS_DIR/SUMMARY.md"
DETAILS="$RESULTS_DIR/.details.md"
: > "$DETAILS"
# The checkout itself, installed or not: the GPU machines have no network for pip, and an uninstalled
# checkout maps kernels/ and profiling/ into igds_fast by itself (igds_fast/__init__.py).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
WHEELS_NOTE="none carried"
if (( ! DRY_RUN )) && compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
  SITE=/tmp/igds_carried_wheels
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS_DIR"/*.whl > "$RESULTS_DIR/wheels.log" 2>&1; then
    export PYTHONPATH="$PYTHONPATH:$SITE"
    WHEELS_NOTE="installed: $(cd "$WHEELS_DIR" && ls *.whl | paste -sd' ' -)"
  else
    WHEELS_NOTE="install FAILED (wheels.log)"
  fi
fi
if ! "$PY" -c "import igds_fast.kernels, igds_fast.profiling, igds_fast.sampling.compiled.step" 2>"$RESULTS_DIR/import_error.log"; then
  echo "gpu_check.sh: igds_fast does not import from $PWD:" >&2
  tail -n 5 "$RESULTS_DIR/import_error.log" >&2
  exit 1
fi
rm -f "$RESULTS_DIR/import_error.log"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/igds_inductor_cache}"
export PYTHONUNBUFFERED=1

field() { local IFS=:; local -a f=($1); echo "${f[$2]}"; }
call_of() { for entry in "${PLAN[@]}"; do [[ "$(field "$entry" 0)" == "$1" ]] && field "$entry" 1; done; }
estimate_of() { for entry in "${PLAN[@]}"; do [[ "$(field "$entry" 0)" == "$1" ]] && field "$entry" 2; done; }
timeout_of() { for entry in "${PLAN[@]}"; do [[ "$(field "$entry" 0)" == "$1" ]] && field "$entry" 3; done; }
call_total() {
  local total=0
  for entry in "${PLAN[@]}"; do [[ "$(field "$entry" 1)" == "$1" ]] && total=$(( total + $(field "$entry" 2) )); done
  echo "$total"
}

# The parts this invocation runs, in plan order.
SELECTED=()
for entry in "${PLAN[@]}"; do
  name="$(field "$entry" 0)"
  if [[ -n "$PARTS" ]]; then
    [[ ",$PARTS," == *",$name,"* ]] && SELECTED+=("$name")
  elif [[ "$(field "$entry" 1)" == "$CALL" ]]; then
    SELECTED+=("$name")
  fi
done
if [[ -z "$BUDGET_S" ]]; then
  if [[ -z "$PARTS" && "$CALL" == 2 ]]; then BUDGET_S=$CALL2_LIMIT_S; else BUDGET_S=$CALL1_LIMIT_S; fi
fi
START_S=$(date +%s)
STATUS_ROWS=()

{
  echo "# GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- host: $(hostname), call: ${PARTS:+custom (}${PARTS:-$CALL}${PARTS:+)}, parts: $(IFS=,; echo "${SELECTED[*]}"), budget: ${BUDGET_S} s, dry run: $DRY_RUN"
  echo "- git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files"
  echo "- carried wheels ($WHEELS_DIR): $WHEELS_NOTE"
} > "$SUMMARY.head"

write_summary() {
  {
    cat "$SUMMARY.head"
    echo
    echo "| part | status | exit | seconds (estimate) | log |"
    echo "|---|---|---:|---:|---|"
    printf '%s\n' "${STATUS_ROWS[@]}"
    for entry in "${PLAN[@]}"; do  # what this invocation does not run, with its estimate
      local name; name="$(field "$entry" 0)"
      [[ " ${SELECTED[*]} " == *" $name "* ]] && continue
      local where="call $(field "$entry" 1)"; [[ "$(field "$entry" 1)" == later ]] && where="a later session"
      echo "| $name | not run here: $where | - | - ($(field "$entry" 2)) | - |"
    done
    cat "$DETAILS"
  } > "$SUMMARY"
}

# What a part's log says in a few lines, for SUMMARY.md: the benches' per-variant lines (times,
# compile / capture seconds), pytest's outcome lines, the self-check rows.
highlights() {
  sed -n '/^--- output ---$/,$p' "$1" \
    | grep -E '^\[bench\]|^\| |passed|failed|error|FAILED|ERROR|not installed|^torch |^xformers|^diffusers|^guided|MiB|^[A-Z].*, [0-9]+ MiB' \
    | tail -n 60
}

# run_part NAME COMMAND... : run with the part's timeout, bounded by the budget left; log to NAME.log.
run_part() {
  local name="$1"; shift
  local limit estimate
  limit="$(timeout_of "$name")"; estimate="$(estimate_of "$name")"
  local log="$RESULTS_DIR/$name.log"
  local left=$(( BUDGET_S - ($(date +%s) - START_S) - 5 ))
  if (( DRY_RUN )); then
    printf '[plan]   %-16s est %4s s (timeout %3s s): %s\n' "$name" "$estimate" "$limit" "$*"
    local call; call="$(call_of "$name")"; [[ "$call" == later ]] && call="later session" || call="call $call"
    STATUS_ROWS+=("| $name | planned (dry run): $call | - | - ($estimate) | $name.log |")
    write_summary
    return 0
  fi
  if (( left < 45 )); then
    echo "[skip] $name: ${left} s of the budget left (estimate ${estimate} s)"
    STATUS_ROWS+=("| $name | not run: ${left} s of the budget left | - | - ($estimate) | - |")
    write_summary
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "[run ] $name (timeout ${limit} s, estimate ${estimate} s): $*"
  local t0; t0=$(date +%s)
  { echo "\$ $*"; echo "--- output ---"; } > "$log"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local seconds=$(( $(date +%s) - t0 ))
  local status="ok"
  if (( rc == 124 || rc == 137 )); then status="TIMEOUT"; elif (( rc != 0 )); then status="FAILED"; fi
  echo "[done] $name: $status (exit $rc, ${seconds} s)"
  tail -n 5 "$log" | sed 's/^/       /'
  STATUS_ROWS+=("| $name | $status | $rc | $seconds ($estimate) | $name.log |")
  { echo; echo "## $name — $status, ${seconds} s"; echo; echo '```'; highlights "$log"; echo '```'; } >> "$DETAILS"
  write_summary
}

skip_part() {  # NAME REASON
  echo "[skip] $1: $2"
  STATUS_ROWS+=("| $1 | skipped: $2 | - | - ($(estimate_of "$1")) | - |")
  write_summary
}

if (( DRY_RUN )); then
  for script in bench/gpu_check.sh profiling/nsys.sh profiling/ncu.sh; do
    bash -n "$script" || { echo "syntax error in $script" >&2; exit 1; }
  done
  "$PY" -m py_compile bench/__init__.py bench/sampler.py bench/models.py bench/peers.py bench/timing.py \
    bench/report.py bench/model_stats.py bench/kernels.py bench/self_check.py profiling/torch_trace.py || exit 1
  echo "[dry ] scripts parse"
  for call in 1 2 later; do
    case "$call" in
      1) echo "[plan] call 1 (at most ${CALL1_LIMIT_S} s): estimate $(call_total 1) s" ;;
      2) echo "[plan] call 2 (at most ${CALL2_LIMIT_S} s, optional, sent at once after call 1): estimate $(call_total 2) s" ;;
      later) echo "[plan] later sessions (not in a call): estimate $(call_total later) s" ;;
    esac
    for entry in "${PLAN[@]}"; do
      [[ "$(field "$entry" 1)" == "$call" ]] && echo "[plan]   $(field "$entry" 0) (est $(field "$entry" 2) s)"
    done
  done
  SELECTED=()
  for entry in "${PLAN[@]}"; do SELECTED+=("$(field "$entry" 0)"); done
  echo "[plan] commands:"
fi

SAMPLER=("$PY" bench/sampler.py --warmup 2 --steps 3)
# Bounded compile for the parts that are not about the inductor flags.
SHORT_COMPILE='{"mode": "default", "inductor_options": {}}'
# pytest-timeout (on the GPU machines' image) bounds each test, so one hang cannot eat the part.
PYTEST_TIMEOUT=()
"$PY" -c "import pytest_timeout" 2>/dev/null && PYTEST_TIMEOUT=(--timeout=150)
has_diffusers() { (( DRY_RUN )) || "$PY" -c "import diffusers" 2>/dev/null; }
wanted() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

wanted env && run_part env bash -c '
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv || true
  "$PYTHON" -c "import torch, triton, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"python\", platform.python_version()); print(torch.cuda.get_device_name(), [round(v / 2**20) for v in torch.cuda.mem_get_info()], \"MiB free/total\")"
  "$PYTHON" -c "import xformers, xformers.ops; print(\"xformers\", xformers.__version__, \"memory_efficient_attention importable\")" 2>&1 | tail -n 1
  "$PYTHON" -c "import diffusers; print(\"diffusers\", diffusers.__version__)" 2>/dev/null || echo "diffusers: not installed"
  "$PYTHON" -c "import guided_diffusion.respace; print(\"guided_diffusion importable\")" 2>/dev/null || echo "guided_diffusion: not installed"
  command -v nsys >/dev/null && nsys --version || echo "nsys: not found"
  nproc; free -g | head -n 2'

# The targets: one process, the same weights and jobs for every row (bench/sampler.py).
wanted adm256 && run_part adm256 "${SAMPLER[@]}" --presets adm256 --batch-sizes 32 \
  --variants eager-fp32,eager-half,gd-fp16,compiled,graphs --half-dtype bf16 \
  --compile-options "$SHORT_COMPILE" --check-fidelity --fidelity-steps 2 \
  --json "$RESULTS_DIR/sampler_adm256.json" --append-results

# -v: one line per test as it ends, so a part cut by its timeout still shows what passed and failed.
wanted gputests && run_part gputests env IGDS_TEST_GPU=1 "$PY" -m pytest -v -rs --durations=10 "${PYTEST_TIMEOUT[@]}" \
  -p igds_fast.profiling.pytest_gpu_select --junitxml="$RESULTS_DIR/gpu_tests.xml" \
  tests/test_compiled.py tests/test_fused_step.py tests/test_kernels_head.py tests/test_kernels_preprocess.py \
  tests/test_kernels_update.py tests/test_kernels_philox.py

wanted digits && run_part digits "$PY" bench/self_check.py --models digits --dtypes bf16,fp16 --compile \
  --compile-options "$SHORT_COMPILE"

if wanted dit256; then
  if has_diffusers; then
    run_part dit256 "$PY" bench/sampler.py --warmup 1 --steps 2 --presets dit-xl2-256 --batch-sizes 16 \
      --variants eager-fp32,minimax-b1,minimax --guidance igds --json "$RESULTS_DIR/sampler_dit256_peers.json" \
      --append-results
  else
    skip_part dit256 "diffusers is not importable (carry $WHEELS_DIR)"
  fi
fi

wanted adm64 && run_part adm64 "$PY" bench/sampler.py --warmup 2 --steps 5 --presets adm64 --batch-sizes 64 \
  --variants compiled,graphs --compile-options "$SHORT_COMPILE" --json "$RESULTS_DIR/sampler_adm64.json" \
  --append-results

wanted kernels && run_part kernels "$PY" bench/kernels.py --append-results

if wanted dit256-compiled; then
  if has_diffusers; then
    run_part dit256-compiled "${SAMPLER[@]}" --presets dit-xl2-256 --batch-sizes 16 --variants compiled,graphs \
      --compile-options "$SHORT_COMPILE" --check-fidelity --json "$RESULTS_DIR/sampler_dit256_compiled.json" \
      --append-results
  else
    skip_part dit256-compiled "diffusers is not importable (carry $WHEELS_DIR)"
  fi
fi

wanted adm256-ma && run_part adm256-ma "${SAMPLER[@]}" --presets adm256 --batch-sizes 32 \
  --variants compiled,graphs --check-fidelity \
  --json "$RESULTS_DIR/sampler_adm256_max_autotune.json" --append-results

wanted selfcheck && run_part selfcheck "$PY" bench/self_check.py --models digits,adm256 --dtypes bf16,fp16 \
  --compile --compile-options "$SHORT_COMPILE"

if wanted nsys; then
  if command -v nsys >/dev/null 2>&1 || (( DRY_RUN )); then
    run_part nsys bash profiling/nsys.sh "$RESULTS_DIR/nsys_adm256_graphs" -- \
      "$PY" bench/sampler.py --presets adm256 --batch-sizes 32 --variants graphs --profile graphs \
      --compile-options "$SHORT_COMPILE" --warmup 2 --steps 3
  else
    # (the GPU machines have no working nsys) a torch.profiler trace of the same run
    run_part nsys "$PY" profiling/torch_trace.py --preset adm256 --batch-size 32 \
      --compile-options "$SHORT_COMPILE" --out "$RESULTS_DIR/torch_trace_adm256"
  fi
fi

wanted tests && run_part tests env IGDS_TEST_GPU=1 "$PY" -m pytest -v -rs --durations=15 "${PYTEST_TIMEOUT[@]}" \
  -p igds_fast.profiling.pytest_gpu_select --junitxml="$RESULTS_DIR/gpu_tests_all.xml" tests

# A/B of the inductor flags at equal mode: the adm64 part ran mode "default" WITHOUT the flags.
wanted flags && run_part flags "${SAMPLER[@]}" --presets adm64 --batch-sizes 64 --variants compiled,graphs \
  --compile-options '{"mode": "default"}' --json "$RESULTS_DIR/sampler_adm64_conv_flags.json"

if (( DRY_RUN )); then
  total=$(call_total 1)
  total2=$(call_total 2)
  if (( total > CALL1_LIMIT_S )); then
    echo "gpu_check.sh: call 1's estimate ${total} s exceeds ${CALL1_LIMIT_S} s" >&2; exit 1
  fi
  if (( total2 > CALL2_LIMIT_S )); then
    echo "gpu_check.sh: call 2's estimate ${total2} s exceeds ${CALL2_LIMIT_S} s" >&2; exit 1
  fi
  echo "[dry ] call 1: ${total} s <= ${CALL1_LIMIT_S} s; call 2: ${total2} s <= ${CALL2_LIMIT_S} s"
else
  cp bench/RESULTS.md "$RESULTS_DIR/RESULTS.md" 2>/dev/null || true
fi
write_summary
rm -f "$SUMMARY.head" "$DETAILS"
echo "summary: $SUMMARY"
cat "$SUMMARY"
