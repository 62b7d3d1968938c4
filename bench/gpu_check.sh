#!/usr/bin/env bash
START_S=$(date +%s)  # the budget clock starts here, at the first line: setup and wheels count too
# Everything that needs a GPU, sized to the device tool's limits, in calls that return their numbers
# even when a part (or the whole call) is killed at its time limit.
#
#   bash bench/gpu_check.sh [--call N] [--parts LIST] [--budget SECONDS] [--cpu-smoke] [--dry-run]
#   bash bench/gpu_check.sh --fetch-wheels       # here, with pip's network: fill bench/wheels/
#
# The device tool (its README): one command <= 600 s (its timeout_s), 15 min of device time a session
# with the machine's 1-2 min start counted in, and at most 8 files back from $OUT (16 MiB each, two
# folders deep). So every call leaves exactly two files in $OUT, rewritten after every part:
#   SUMMARY.md        read this first: each part's status, seconds and highlights, the clock
#   gpu_check.tar.gz  gpu_check/: every part's log, the benches' JSON and reports, the test XML
# (a part that declares its own archive, e.g. a trace, adds one file: counted by --dry-run).
# The clock starts at this script's first line; a part is stopped (TERM, KILL 5 s later) early
# enough that summary and archive are rewritten before the call's timeout_s, less SAFETY_S.
#
# The calls (timeout_s for the device tool's `run`; estimates are guesses until SUMMARY.md's measured
# seconds replace them; `--dry-run` prints them with each part's command):
#   call 1 (540 s): env, adm256 (the headline rows: compiled+graphs, eager fp32, gd-fp16, compiled,
#                   eager bf16 at batch 32, the replay's fidelity), gputests (the cheap kernel / fused
#                   GPU tests, cheapest first)
#   call 2 (150 s, the same session, sent the moment call 1 returns): gputests-compiled
#   call 3 (540 s, a later session): adm64, kernels, digits, dit256, attention
#   call 4 (540 s): adm256-ma (max-autotune: its gain over call 1's graphs row)
#   call 5 (540 s): dit256-compiled, selfcheck
#   call 6 (540 s): nsys (or a torch trace), flags
#   call 7 (540 s): tests (every GPU test of the suite)
# Every device call names `bench/wheels` in `carry` (the wheels are gitignored).
#
# --cpu-smoke: the same parts, files and archive with the GPU work replaced by the tiny presets (CI
# runs call 1 so the script cannot rot). --parts LIST runs those parts (plan order); --budget
# overrides the call's timeout_s. --dry-run (any machine): syntax checks, the plan, and a failure
# when a call exceeds 8 files, its timeout_s or 600 s, or a session its device time.
# $IGDS_GPU_CHECK_PLAN: a bash file redefining CALLS / PLAN (tests, what-ifs). Output: $OUT, else
# ./gpu_results; work files under $IGDS_GPU_CHECK_WORK (default: a new folder in /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE_CALL_MAX_S=600 DEVICE_SESSION_S=900 DEVICE_START_S=120 DEVICE_TRANSFER_S=20 DEVICE_FILES_MAX=8
SAFETY_S=10    # the script is done this long before the call's timeout_s
KILL_AFTER_S=5 # KILL this long after a part's TERM
FINISH_S=5     # summary + archive after each part
SETUP_S=15     # wheels and the import check (estimate)
MIN_PART_S=20  # a part starts only with this much of its limit left
WHEELS_DIR=bench/wheels
ARCHIVE=gpu_check.tar.gz
ARCHIVE_MAX_BYTES=$((15 * 1024 * 1024))

# call:timeout_s:session:when
CALLS=(
  "1:540:A:the first call of a session with a GPU"
  "2:150:A:sent the moment call 1 returns (the machine stays warm 30 s)"
  "3:540:B:a later session"
  "4:540:C:a later session"
  "5:540:D:a later session"
  "6:540:E:a later session"
  "7:540:F:a later session"
)
# name:call:estimate_s:timeout_s:own_files (own_files: archives a part puts in $OUT beside the main one)
PLAN=(
  "env:1:20:60:0"
  "adm256:1:300:420:0"
  "gputests:1:60:90:0"
  "gputests-compiled:2:110:120:0"
  "adm64:3:110:150:0"
  "kernels:3:50:90:0"
  "digits:3:60:120:0"
  "dit256:3:60:120:0"
  "attention:3:140:180:0"
  "adm256-ma:4:480:510:0"
  "dit256-compiled:5:250:300:0"
  "selfcheck:5:200:240:0"
  "nsys:6:150:240:1"
  "flags:6:150:200:0"
  "tests:7:480:510:0"
)
[[ -n "${IGDS_GPU_CHECK_PLAN:-}" ]] && source "$IGDS_GPU_CHECK_PLAN"

DRY_RUN=0 SMOKE=0 FETCH=0 CALL="" PARTS="" BUDGET_S=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --cpu-smoke) SMOKE=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --call) CALL="${2:-}"; shift ;;
    --parts) PARTS="${2:-}"; shift ;;
    --budget) BUDGET_S="${2:-}"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

field() { local IFS=:; local -a f=($1); echo "${f[$2]}"; }
part_field() { local e; for e in "${PLAN[@]}"; do [[ "$(field "$e" 0)" == "$1" ]] && field "$e" "$2"; done; }
call_field() { local e; for e in "${CALLS[@]}"; do [[ "$(field "$e" 0)" == "$1" ]] && field "$e" "$2"; done; }
parts_of_call() { local e; for e in "${PLAN[@]}"; do [[ "$(field "$e" 1)" == "$1" ]] && field "$e" 0; done; }

[[ -z "$CALL" && -z "$PARTS" ]] && CALL=1
if [[ -n "$CALL" && -z "$(call_field "$CALL" 1)" ]]; then
  echo "gpu_check.sh: --call must be one of $(printf '%s\n' "${CALLS[@]}" | cut -d: -f1 | paste -sd' ' -), got $CALL" >&2
  exit 2
fi
for part in ${PARTS//,/ }; do
  [[ -n "$(part_field "$part" 1)" ]] || {
    echo "gpu_check.sh: unknown part $part (known: $(printf '%s\n' "${PLAN[@]}" | cut -d: -f1 | paste -sd, -))" >&2
    exit 2
  }
done
if [[ -n "$BUDGET_S" && ! "$BUDGET_S" =~ ^[0-9]+$ ]]; then echo "gpu_check.sh: --budget takes seconds" >&2; exit 2; fi

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

# The parts this invocation runs, in plan order.
SELECTED=()
for entry in "${PLAN[@]}"; do
  name="$(field "$entry" 0)"
  if [[ -n "$PARTS" ]]; then [[ ",$PARTS," == *",$name,"* ]] && SELECTED+=("$name")
  elif [[ "$(field "$entry" 1)" == "$CALL" ]]; then SELECTED+=("$name"); fi
done
TIMEOUT_S="${BUDGET_S:-$(call_field "${CALL:-1}" 1)}"
DEADLINE_S=$(( START_S + TIMEOUT_S - SAFETY_S ))

OUT_DIR="${OUT:-./gpu_results}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${IGDS_GPU_CHECK_WORK:-}"
[[ -z "$WORK" ]] && WORK="$(mktemp -d "${TMPDIR:-/tmp}/igds_gpu_check.XXXXXX")" && (( DRY_RUN )) && trap 'rm -rf "$WORK"' EXIT
R="$WORK/gpu_check"  # what the archive holds
mkdir -p "$R" "$WORK/details" "$WORK/own"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/igds_inductor_cache}"

# ---- the parts' commands ---------------------------------------------------------------------------
# TIMING: the timing parts measure the step alone: no first-step self-check, SDPA attention (the
# self-check and attention "auto" with xformers have parts of their own). SMOKE_COMPILE: CPU, seconds.
TIMING='{"self_check": false, "attention": "sdpa"}'
SMOKE_COMPILE='{"backend": "aot_eager", "dtype": "fp32", "channels_last": false, "self_check": false, "attention": "sdpa"}'
PYTEST_TIMEOUT_OK=0
# pytest-timeout bounds each test (the GPU image has it; a dry run prints the GPU's commands).
if (( DRY_RUN )) || "$PY" -c "import pytest_timeout" 2>/dev/null; then PYTEST_TIMEOUT_OK=1; fi
CHEAP_GPU_TESTS="tests/test_kernels_philox.py tests/test_kernels_update.py tests/test_kernels_preprocess.py
  tests/test_kernels_head.py tests/test_fused_step.py"
has() { (( DRY_RUN )) || "$PY" -c "import $1" 2>/dev/null; }

# part_command NAME: CMD (the command) and SKIP (why it cannot run here, or empty).
part_command() {
  local name="$1" bench=("$PY" bench/sampler.py --same-math-rounds 0) append=(--append-results)
  local gpu_pytest=(env IGDS_TEST_GPU=1 "$PY" -m pytest -v -rs --durations=10 -p igds_fast.profiling.pytest_gpu_select)
  (( SMOKE )) && { append=(); gpu_pytest=("$PY" -m pytest -v -rs -p igds_fast.profiling.pytest_gpu_select); }
  local per_test=(); (( PYTEST_TIMEOUT_OK )) && per_test=(--timeout=60)
  CMD=() SKIP=""
  case "$name:$SMOKE" in
    env:*) CMD=(bash -c '
      command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit --format=csv || echo "nvidia-smi: not found"
      "$PYTHON" -c "import torch, triton, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"python\", platform.python_version()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else \"no CUDA device\", [round(v / 2**20) for v in torch.cuda.mem_get_info()] if torch.cuda.is_available() else [], \"MiB free/total\")"
      "$PYTHON" -c "import xformers, xformers.ops; print(\"xformers\", xformers.__version__, \"memory_efficient_attention importable\")" 2>&1 | tail -n 1
      "$PYTHON" -c "import diffusers; print(\"diffusers\", diffusers.__version__)" 2>/dev/null || echo "diffusers: not installed"
      "$PYTHON" -c "import guided_diffusion.respace; print(\"guided_diffusion importable\")" 2>/dev/null || echo "guided_diffusion: not installed"
      "$PYTHON" -c "import pytest_timeout; print(\"pytest-timeout importable\")" 2>/dev/null || echo "pytest-timeout: not installed"
      command -v nsys >/dev/null && nsys --version || echo "nsys: not found"
      echo "cpus $(nproc)"; free -g | head -n 2') ;;
    # The headline first: compiled+graphs (its fidelity right after), then the baselines.
    adm256:0) CMD=("${bench[@]}" --warmup 2 --steps 3 --presets adm256 --batch-sizes 32
      --variants graphs,eager-fp32,gd-fp16,compiled,eager-half --half-dtype bf16 --compile-options "$TIMING"
      --check-fidelity --fidelity-steps 2 --json "$R/sampler_adm256.json" --report "$R/sampler_adm256.md" "${append[@]}") ;;
    adm256:1) CMD=("${bench[@]}" --warmup 1 --steps 1 --presets tiny --batch-sizes 2
      --variants compiled,eager-fp32,gd-fp16,eager-half --half-dtype bf16 --compile-options "$SMOKE_COMPILE"
      --check-fidelity --fidelity-steps 1 --json "$R/sampler_adm256.json" --report "$R/sampler_adm256.md") ;;
    gputests:*) CMD=("${gpu_pytest[@]}" "${per_test[@]}" --junitxml="$R/gpu_tests.xml" $CHEAP_GPU_TESTS) ;;
    gputests-compiled:*) (( PYTEST_TIMEOUT_OK )) && per_test=(--timeout=120)
      CMD=("${gpu_pytest[@]}" "${per_test[@]}" --junitxml="$R/gpu_tests_compiled.xml" tests/test_compiled.py) ;;
    adm64:0) CMD=("${bench[@]}" --warmup 2 --steps 5 --presets adm64 --batch-sizes 64 --variants graphs,compiled
      --compile-options "$TIMING" --json "$R/sampler_adm64.json" --report "$R/sampler_adm64.md" "${append[@]}") ;;
    adm64:1|flags:1|attention:1) CMD=("${bench[@]}" --warmup 1 --steps 1 --presets tiny --batch-sizes 2
      --variants compiled --compile-options "$SMOKE_COMPILE" --json "$R/sampler_$name.json" --report "$R/sampler_$name.md") ;;
    kernels:0) CMD=("$PY" bench/kernels.py "${append[@]}") ;;
    kernels:1) CMD=("$PY" bench/kernels.py --only philox) ;;
    digits:0) CMD=("$PY" bench/self_check.py --models digits --dtypes bf16,fp16 --compile) ;;
    digits:1|selfcheck:1) CMD=("$PY" bench/self_check.py --models tiny --dtypes bf16 --steps 4 --compile
      --compile-options '{"backend": "aot_eager"}') ;;
    selfcheck:0) CMD=("$PY" bench/self_check.py --models digits,adm256 --dtypes bf16,fp16 --compile) ;;
    dit256:*|dit256-compiled:*)
      local preset=dit-xl2-256 batch=16 variants=eager-fp32,minimax-b1,minimax options="$TIMING"
      (( SMOKE )) && preset=dit-tiny batch=2 options="$SMOKE_COMPILE"
      [[ "$name" == dit256-compiled ]] && variants="compiled$( (( SMOKE )) || echo ,graphs)"
      CMD=("${bench[@]}" --warmup 1 --steps 2 --presets "$preset" --batch-sizes "$batch" --variants "$variants"
        --guidance igds --compile-options "$options" --json "$R/sampler_$name.json" --report "$R/sampler_$name.md"
        "${append[@]}")
      has diffusers || SKIP="diffusers is not importable (carry $WHEELS_DIR)" ;;
    attention:0) CMD=("${bench[@]}" --warmup 2 --steps 3 --presets adm256 --batch-sizes 32 --variants graphs
      --compile-options '{"self_check": false, "attention": "auto"}' --json "$R/sampler_attention.json"
      --report "$R/sampler_attention.md" "${append[@]}") ;;
    adm256-ma:0) CMD=("${bench[@]}" --warmup 2 --steps 3 --presets adm256 --batch-sizes 32 --variants graphs,compiled
      --compile-options '{"mode": "max-autotune-no-cudagraphs", "self_check": false, "attention": "sdpa"}'
      --check-fidelity --fidelity-steps 2 --json "$R/sampler_adm256_ma.json" --report "$R/sampler_adm256_ma.md"
      "${append[@]}") ;;
    adm256-ma:1) CMD=("${bench[@]}" --warmup 1 --steps 1 --presets tiny --batch-sizes 2 --variants compiled
      --compile-options '{"backend": "aot_eager", "mode": "max-autotune-no-cudagraphs", "self_check": false}'
      --json "$R/sampler_adm256_ma.json" --report "$R/sampler_adm256_ma.md") ;;
    nsys:0) if command -v nsys >/dev/null 2>&1 || (( DRY_RUN )); then
        CMD=(bash profiling/nsys.sh "$WORK/own/nsys/adm256_graphs" -- "$PY" bench/sampler.py --presets adm256
          --batch-sizes 32 --variants graphs --profile graphs --compile-options "$TIMING" --warmup 2 --steps 3)
      else  # (the GPU machines have no working nsys) a torch.profiler trace of the same step
        CMD=("$PY" profiling/torch_trace.py --preset adm256 --batch-size 32 --compile-options "$TIMING"
          --out "$WORK/own/nsys/torch_trace_adm256")
      fi ;;
    nsys:1) CMD=("$PY" profiling/torch_trace.py --preset tiny --backend eager --steps 1 --out "$WORK/own/nsys/torch_trace_tiny") ;;
    # A/B of the one default inductor flag (1x1 convolutions as matmuls): adm64's rows have it.
    flags:0) CMD=("${bench[@]}" --warmup 2 --steps 5 --presets adm64 --batch-sizes 64 --variants graphs,compiled
      --compile-options '{"inductor_options": {}, "self_check": false, "attention": "sdpa"}'
      --json "$R/sampler_flags.json" --report "$R/sampler_flags.md") ;;
    tests:*) (( PYTEST_TIMEOUT_OK )) && per_test=(--timeout=150)
      CMD=("${gpu_pytest[@]}" "${per_test[@]}" --junitxml="$R/gpu_tests_all.xml" tests) ;;
    *) SKIP="no command for part $name" ;;
  esac
}

# ---- the summary and the archive -----------------------------------------------------------------
STATUS=()  # "name|status|exit|seconds|limit"
status_of() { local s; for s in "${STATUS[@]}"; do [[ "${s%%|*}" == "$1" ]] && echo "$s"; done; }
set_status() {  # name status exit seconds limit
  local row="$1|$2|$3|$4|$5" i
  for i in "${!STATUS[@]}"; do [[ "${STATUS[$i]%%|*}" == "$1" ]] && { STATUS[$i]="$row"; return; }; done
  STATUS+=("$row")
}
MODE_TEXT="GPU"; (( SMOKE )) && MODE_TEXT="CPU smoke (tiny presets: the numbers mean nothing)"
(( DRY_RUN )) && MODE_TEXT="dry run (nothing ran)"
WHEELS_NOTE="none carried"

write_summary() {
  local now; now=$(date +%s)
  {
    echo "# GPU check — $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "- ${PARTS:+parts $PARTS}${PARTS:-call $CALL}: $(IFS=,; echo "${SELECTED[*]}"); mode: $MODE_TEXT"
    echo "- clock: $(( now - START_S )) s since the script's first line; timeout_s $TIMEOUT_S, parts stopped by $(( TIMEOUT_S - SAFETY_S )) s"
    echo "- host $(hostname), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown) + $(git status --porcelain 2>/dev/null | wc -l | tr -d ' ') changed files; wheels ($WHEELS_DIR): $WHEELS_NOTE"
    echo "- in \$OUT: SUMMARY.md, $ARCHIVE (gpu_check/: every part's log, the JSON and reports, the test XML)$OWN_NOTE"
    echo
    echo "| part | status | exit | seconds (estimate) | limit s | log |"
    echo "|---|---|---:|---:|---:|---|"
    local name row status code seconds limit
    for name in "${SELECTED[@]}"; do
      row="$(status_of "$name")"
      if [[ -z "$row" ]]; then
        echo "| $name | pending | - | - ($(part_field "$name" 2)) | $(part_field "$name" 3) | - |"
        continue
      fi
      IFS='|' read -r _ status code seconds limit <<< "$row"
      echo "| $name | $status | $code | $seconds ($(part_field "$name" 2)) | $limit | gpu_check/$name.log |"
    done
    for entry in "${PLAN[@]}"; do
      name="$(field "$entry" 0)"
      [[ " ${SELECTED[*]} " == *" $name "* ]] && continue
      echo "| $name | not in this run: call $(field "$entry" 1) (timeout_s $(call_field "$(field "$entry" 1)" 1)) | - | - ($(field "$entry" 2)) | $(field "$entry" 3) | - |"
    done
    for name in "${SELECTED[@]}"; do [[ -f "$WORK/details/$name.md" ]] && cat "$WORK/details/$name.md"; done
  } > "$OUT_DIR/.SUMMARY.md.tmp"
  mv -f "$OUT_DIR/.SUMMARY.md.tmp" "$OUT_DIR/SUMMARY.md"
}

OWN_NOTE=""
write_archive() {  # gpu_check/ into $OUT, under the device's 16 MiB per file; the largest files left out if not
  cp "$OUT_DIR/SUMMARY.md" "$R/SUMMARY.md" 2>/dev/null
  tar -czf "$OUT_DIR/.$ARCHIVE.tmp" -C "$WORK" gpu_check 2>/dev/null
  if (( $(stat -c %s "$OUT_DIR/.$ARCHIVE.tmp") > ARCHIVE_MAX_BYTES )); then
    find "$R" -type f -size +1M -printf '%P\n' > "$WORK/left_out.txt"
    tar -czf "$OUT_DIR/.$ARCHIVE.tmp" -C "$WORK" --exclude-from=<(sed 's|^|gpu_check/|' "$WORK/left_out.txt") gpu_check
    OWN_NOTE="; left out of the archive (over its size): $(paste -sd' ' "$WORK/left_out.txt")"
  fi
  mv -f "$OUT_DIR/.$ARCHIVE.tmp" "$OUT_DIR/$ARCHIVE"
}

# What a part's log says in a few lines: the benches' rows, pytest's outcomes, the self-check rows,
# the compile's progress (case-insensitive: pytest -v writes PASSED / FAILED).
highlights() {
  sed -n '/^--- output ---$/,$p' "$1" | grep -aiE '^\[bench\]|^\| |passed|failed|error|timeout|skipped|not installed|not found|^torch |^xformers|^diffusers|^guided|MiB|^(model|tiny|digits|adm256) |^compiled backend:|^cpus ' | tail -n 60
}

# ---- running a part ------------------------------------------------------------------------------
run_part() {
  local name="$1" limit estimate log="$R/$1.log" now left
  limit="$(part_field "$name" 3)" estimate="$(part_field "$name" 2)"
  part_command "$name"
  if [[ -n "$SKIP" ]]; then
    echo "[skip] $name: $SKIP"; set_status "$name" "skipped: $SKIP" - - -; write_summary; write_archive; return
  fi
  now=$(date +%s)
  left=$(( DEADLINE_S - now - KILL_AFTER_S - FINISH_S ))
  (( limit > left )) && limit=$left
  if (( limit < MIN_PART_S )); then
    echo "[skip] $name: $(( DEADLINE_S - now )) s of the clock left (estimate $estimate s)"
    set_status "$name" "not run: $(( DEADLINE_S - now )) s of the clock left" - - -; write_summary; write_archive; return
  fi
  echo "[run ] $name (limit $limit s, estimate $estimate s, clock $(( now - START_S )) s): ${CMD[*]}"
  set_status "$name" "running since $(( now - START_S )) s (stopped by $(( now - START_S + limit )) s)" - - "$limit"
  write_summary
  { echo "\$ ${CMD[*]}"; echo "--- output ---"; } > "$log"
  [[ "$(part_field "$name" 4)" != 0 ]] && mkdir -p "$WORK/own/$name"
  timeout --signal=TERM --kill-after="$KILL_AFTER_S" "$limit" "${CMD[@]}" >> "$log" 2>&1
  local rc=$? seconds=$(( $(date +%s) - now )) status=ok
  if (( rc == 124 || rc == 137 )); then status=TIMEOUT; elif (( rc != 0 )); then status=FAILED; fi
  echo "[done] $name: $status (exit $rc, $seconds s)"
  tail -n 5 "$log" | sed 's/^/       /'
  set_status "$name" "$status" "$rc" "$seconds" "$limit"
  { echo; echo "## $name — $status, $seconds s"; echo; echo '```'; highlights "$log"; echo '```'; } > "$WORK/details/$name.md"
  if [[ "$(part_field "$name" 4)" != 0 && -d "$WORK/own/$name" ]]; then
    tar -czf "$OUT_DIR/.$name.tar.gz.tmp" -C "$WORK/own" "$name" && mv -f "$OUT_DIR/.$name.tar.gz.tmp" "$OUT_DIR/$name.tar.gz"
  fi
  write_summary
  write_archive
}

# ---- the plan against the device's limits ---------------------------------------------------------
check_plan() {  # prints each call against its limits; returns 1 when any call or session breaks one
  local bad=0 entry call timeout session est files parts limit sessions="" s total
  for entry in "${CALLS[@]}"; do
    call="$(field "$entry" 0)" timeout="$(field "$entry" 1)" session="$(field "$entry" 2)"
    est=$SETUP_S files=2 parts=""
    for part in $(parts_of_call "$call"); do
      est=$(( est + $(part_field "$part" 2) + FINISH_S ))
      files=$(( files + $(part_field "$part" 4) ))
      parts+=" $part $(part_field "$part" 2) s,"
      limit="$(part_field "$part" 3)"
      if (( limit > timeout - SAFETY_S - SETUP_S )); then
        echo "gpu_check.sh: part $part's limit ${limit} s does not fit in call $call's timeout_s ${timeout} s" >&2; bad=1
      fi
    done
    echo "[plan] call $call (timeout_s $timeout, session $session: $(field "$entry" 3)):${parts%,}"
    echo "[plan]   estimate $est s (setup $SETUP_S + parts + $FINISH_S s each) <= $(( timeout - SAFETY_S )) s; files back $files <= $DEVICE_FILES_MAX"
    if (( est > timeout - SAFETY_S )); then
      echo "gpu_check.sh: call $call's estimate ${est} s exceeds its timeout_s ${timeout} s less ${SAFETY_S} s" >&2; bad=1
    fi
    if (( timeout > DEVICE_CALL_MAX_S )); then
      echo "gpu_check.sh: call $call's timeout_s ${timeout} s exceeds the device's ${DEVICE_CALL_MAX_S} s a command" >&2; bad=1
    fi
    if (( files > DEVICE_FILES_MAX )); then
      echo "gpu_check.sh: call $call would leave ${files} files in \$OUT; the device returns ${DEVICE_FILES_MAX}" >&2; bad=1
    fi
    [[ " $sessions " == *" $session "* ]] || sessions+=" $session"
  done
  for s in $sessions; do
    total=$DEVICE_START_S
    for entry in "${CALLS[@]}"; do
      [[ "$(field "$entry" 2)" == "$s" ]] && total=$(( total + $(field "$entry" 1) + DEVICE_TRANSFER_S ))
    done
    echo "[plan] session $s: start $DEVICE_START_S s + its calls' timeout_s + $DEVICE_TRANSFER_S s transfers each = $total s <= $DEVICE_SESSION_S s of device time"
    if (( total > DEVICE_SESSION_S )); then
      echo "gpu_check.sh: session $s needs ${total} s of device time; a session has ${DEVICE_SESSION_S} s" >&2; bad=1
    fi
  done
  return $bad
}

if (( DRY_RUN )); then
  for script in bench/gpu_check.sh profiling/nsys.sh profiling/ncu.sh; do
    bash -n "$script" || { echo "gpu_check.sh: syntax error in $script" >&2; exit 1; }
  done
  "$PY" -m py_compile bench/__init__.py bench/sampler.py bench/models.py bench/peers.py bench/timing.py \
    bench/report.py bench/model_stats.py bench/kernels.py bench/self_check.py profiling/torch_trace.py || exit 1
  echo "[dry ] scripts parse"
  check_plan; ok=$?
  echo "[plan] commands ($MODE_TEXT; \$R = the archive's gpu_check/):"
  for entry in "${PLAN[@]}"; do
    name="$(field "$entry" 0)"
    part_command "$name"
    text="${CMD[*]//$R/\$R}"
    [[ "$name" == env ]] && text="bash -c '<nvidia-smi; torch, triton, xformers, diffusers, guided-diffusion, pytest-timeout, nsys: versions or absent; cpus; memory>'"
    printf '[plan]   %-17s call %s, est %3s s, limit %3s s: %s\n' "$name" "$(field "$entry" 1)" "$(field "$entry" 2)" \
      "$(field "$entry" 3)" "$(tr -s ' \n' ' ' <<< "${text//$WORK/\$WORK}")${SKIP:+ (skip: $SKIP)}"
    set_status "$name" "planned (dry run): call $(field "$entry" 1)" - - "$(field "$entry" 3)"
  done
  SELECTED=(); for entry in "${PLAN[@]}"; do SELECTED+=("$(field "$entry" 0)"); done
  write_summary
  (( ok == 0 )) || exit 1
  echo "[dry ] every call fits its timeout_s and the device's file limit; every session its device time"
  exit 0
fi

# ---- setup (inside the clock): the carried wheels, the import check ------------------------------
trap 'write_summary; write_archive; exit 143' TERM INT
write_summary
{
  echo "\$ setup: carried wheels, import check"
  if compgen -G "$WHEELS_DIR/*.whl" >/dev/null; then
    SITE=/tmp/igds_carried_wheels
    if timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS_DIR"/*.whl; then
      export PYTHONPATH="$PYTHONPATH:$SITE"
      WHEELS_NOTE="installed: $(cd "$WHEELS_DIR" && ls *.whl | paste -sd' ' -)"
    else
      WHEELS_NOTE="install FAILED (gpu_check/setup.log)"
    fi
  fi
  echo "wheels: $WHEELS_NOTE"
} > "$R/setup.log" 2>&1
if ! timeout 120 "$PY" -c "import igds_fast.kernels, igds_fast.profiling, igds_fast.sampling.compiled.step" >> "$R/setup.log" 2>&1; then
  echo "gpu_check.sh: igds_fast does not import from $PWD (gpu_check/setup.log)" >&2
  tail -n 5 "$R/setup.log" >&2
  set_status setup "FAILED: igds_fast does not import" 1 - -; SELECTED=(setup "${SELECTED[@]}")
  write_summary; write_archive; exit 1
fi
echo "setup done at $(( $(date +%s) - START_S )) s" >> "$R/setup.log"

for part in "${SELECTED[@]}"; do run_part "$part"; done

(( ! SMOKE )) && cp bench/RESULTS.md "$R/RESULTS.md" 2>/dev/null
write_summary
write_archive
files=$(find "$OUT_DIR" -type f | wc -l)
(( files > DEVICE_FILES_MAX )) && echo "gpu_check.sh: $files files in $OUT_DIR; the device returns $DEVICE_FILES_MAX" >&2
echo "summary: $OUT_DIR/SUMMARY.md (clock $(( $(date +%s) - START_S )) s of $TIMEOUT_S s)"
cat "$OUT_DIR/SUMMARY.md"
