"""The distill command's flags: the digits demo's refusals, --out, torchrun, pinned CPU threads, the
one Triton-on-CPU message, the manifest's applicable settings and versions, a full disk."""
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

import test_distill
from test_distill import _parse, listing, make_config
from igds_fast import cli
from igds_fast.cli import demo as demo_cli
from igds_fast.cli import distill as distill_cli
from igds_fast.distill import DistillConfig, plan_distill
from igds_fast.distributed import QuietRankError
from igds_fast.errors import IGDSInputError
from igds_fast.presets import digits, digits_demo
from igds_fast.sampling.backends import TRITON_ON_CPU_MESSAGE, check_triton_runs_on, resolve_noise_source
from igds_fast.settings import flags_of

pytestmark = pytest.mark.usefixtures("one_thread")
models = test_distill.models  # the module-scoped fixture: a random-weight prior and VE on disk
MODE_FLAGS = ("--prior", "--diffusers", "--ve")  # these turn the demo into a distillation run


def _run(argv):
    """`igds-fast distill ARGV` as the command line runs it (no models: the digits demo)."""
    args = _parse(argv)
    return args.handler(args)


def _example_argv(flag: str) -> list[str]:
    """A value for `flag` other than its default, from the distill parser's own declaration."""
    parser = cli.build_parser()
    distill_parser = next(action for action in parser._actions if action.dest == "command").choices["distill"]
    action = next(a for a in distill_parser._actions if flag in a.option_strings)
    if action.nargs == 0:
        return [flag]
    if action.choices:
        return [flag, str(action.choices[-1])]
    if action.type in (int, float):
        return [flag, "2"]
    return [flag, "imagewoof"]


@pytest.fixture
def no_demo_run(monkeypatch):
    """The demo must be refused before it starts: running it fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the demo ran")

    monkeypatch.setattr(demo_cli, "run_digits", fail)


def test_every_flag_the_demo_does_not_take_is_refused_in_one_line_naming_it(no_demo_run, capsys):
    demo_flags = set(flags_of(digits_demo.DigitsDemo, old=True))
    refused = [flag for flag in dict.fromkeys(flags_of(DistillConfig, old=True))
               if flag not in demo_flags and flag not in MODE_FLAGS]
    assert {"--classes", "--seed", "--composite", "--backend", "--noise", "--gamma", "--trace",
            "--compile-dtype", "--select", "--preset"} <= set(refused)
    for flag in refused:
        for preset in ([], ["--preset", "digits"]):
            argv = [*preset, *_example_argv(flag)]
            with pytest.raises(IGDSInputError) as info:
                _run(argv)
            message = str(info.value)
            assert message.startswith(f"{flag} applies to a distillation run") and "\n" not in message, argv
    # Several at once: all of them named in the one line; nothing printed before the refusal.
    capsys.readouterr()  # (the notes that --preset digits is now `igds-fast demo digits`)
    with pytest.raises(IGDSInputError, match=r"^--classes, --seed apply to a distillation run"):
        _run(["--classes", "imagewoof", "--seed", "0"])
    assert capsys.readouterr().err == ""


def test_demo_only_flags_are_refused_for_a_distillation_run(models, tmp_path):
    base = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--out", str(tmp_path / "never")]
    for extra, named in ((["--fast"], "--fast applies"), (["--work-dir", "w"], "--work-dir applies"),
                         (["--eval-seeds", "2", "--fast"], "--eval-seeds, --fast apply")):
        with pytest.raises(IGDSInputError, match=f"^{named} to the digits demo"):
            _run(base + extra)
    with pytest.raises(IGDSInputError, match="--noise-schedule applies to diffusers folders only"):
        _run(base + ["--noise-schedule", "cosine"])
    with pytest.raises(IGDSInputError, match="--head triton applies to the eager backend"):
        _run(base + ["--backend", "compiled", "--head", "triton"])
    assert not (tmp_path / "never").exists()


def _fake_results(settings):
    return {
        "settings": {"ipcs": list(settings.ipcs), "seeds": settings.seeds, "scale": settings.scale,
                     "beta_by_ipc": {"1": 0.0}, "eval_network": "convnet3", "eval_width": 64, "eval_epochs": 200,
                     "sampling_steps": settings.sampling_steps},
        "split": {"image_size": 16, "train_images": 1258, "test_images": 539},
        "accuracies": {m: {str(k): [50.0] for k in settings.ipcs} for m in ("random", "ddpm", "igds")},
        "timings_s": {"prior": 1.0, "ve": 1.0, "distill": 1.0, "evaluate": 1.0, "total": 4.0},
        "prior": {"cached": True}, "ve": {"cached": True},
    }


def test_the_demo_says_first_what_it_does_how_long_and_where_it_writes(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_run_digits(settings, work_dir, log, out_dir=None, retrain_prior=False, force=False):
        calls.append((settings, work_dir, out_dir, capsys.readouterr().err))
        return _fake_results(settings)

    monkeypatch.setattr(demo_cli, "run_digits", fake_run_digits)
    work, out = tmp_path / "work", tmp_path / "out"
    assert _run(["--work-dir", str(work), "--out", str(out), "--cpu-threads", "2"]) == 0
    settings, work_dir, out_dir, announced = calls[-1]
    assert (work_dir, out_dir) == (str(work), str(out)) and settings.threads == 2
    assert announced.startswith("digits demo (no --prior/--ve given)")
    assert f"cached in {work}" in announced and os.path.join(str(out), "distilled") in announced
    assert os.path.join(str(out), "results.json") in announced and "2-core CPU" in announced
    assert f"{digits_demo.FIRST_RUN_MINUTES} minutes" in announced  # the defaults' measured time
    assert f"results written to {os.path.join(str(out), 'results.json')}" in capsys.readouterr().out
    # Without --out the outputs go to the work dir; --quiet says nothing.
    assert _run(["--fast", "--work-dir", str(work), "--quiet"]) == 0
    assert calls[-1][2] == str(work) and calls[-1][3] == "" and calls[-1][0].threads == 1


def test_the_demo_is_refused_under_torchrun_once(monkeypatch, no_demo_run):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(IGDSInputError, match="the digits demo runs in one process: start it without torchrun") as info:
        _run([])
    assert not getattr(info.value, "quiet", False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(QuietRankError):  # rank 0 reports it; the others exit non-zero silently
        _run(["--fast"])


def test_cpu_distill_pins_its_threads_whatever_the_process_setting(models, tmp_path, monkeypatch):
    seen = []

    def fake_distill(config):
        seen.append(torch.get_num_threads())
        return {"run": {}}  # like a non-zero rank: nothing to report

    monkeypatch.setattr(distill_cli, "distill", fake_distill)
    base = ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--out", str(tmp_path / "o"),
            "--device", "cpu"]
    torch.set_num_threads(2)  # what torchrun leaves a single rank with (OMP_NUM_THREADS unset)
    assert _run(base) == 0
    assert _run(base + ["--cpu-threads", "2"]) == 0
    assert seen == [1, 2] and torch.get_num_threads() == 2  # restored afterwards
    with pytest.raises(IGDSInputError, match="--cpu-threads applies to CPU runs only"):
        _run([*base[:-1], "meta", "--cpu-threads", "2"])  # any device but the CPU
    with pytest.raises(IGDSInputError, match="--cpu-threads must be a positive integer"):
        _run(base + ["--cpu-threads", "0"])


def _small_args(models, out):
    """8 images (4 classes x IPC 2, one sample each) in 4 batches of 2, 4 steps."""
    return ["--prior", models["prior"], "--ve", models["ve"], "--ipc", "2", "--composite", "1", "--steps", "4",
            "--batch-size", "2", "--seed", "5", "--out", str(out), "--device", "cpu", "--quiet"]


def test_the_same_bytes_at_any_process_thread_count(models, tmp_path):
    """Entered with 1 or 2 threads, the command samples with the pinned count: the same files."""
    folders = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        out = tmp_path / f"threads{threads}"
        assert _run(_small_args(models, out)) == 0
        folders.append(out)
        assert json.loads((out / "manifest.json").read_text())["run"]["threads"] == 1
    assert listing(folders[0]) == listing(folders[1])


def test_one_message_for_the_triton_kernels_on_a_cpu_without_the_interpreter(models, tmp_path, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine compiles the kernels")
    # The kernels are imported (interpreted) first: imported under TRITON_INTERPRET=0 they would stay
    # compiled-mode for the rest of this process.
    check_triton_runs_on("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(IGDSInputError) as info:
        check_triton_runs_on("cpu")
    assert str(info.value) == TRITON_ON_CPU_MESSAGE
    noise, _ = resolve_noise_source("philox")
    with pytest.raises(IGDSInputError, match="TRITON_INTERPRET=1"):
        noise([1, 2], 0, (1, 4, 4), "cpu")
    for options in ({"noise": "philox"}, {"backend__name": "compiled"}, {"head": "triton"}):
        with pytest.raises(IGDSInputError) as info:
            plan_distill(make_config(models, tmp_path / "never", **options))
        assert str(info.value) == TRITON_ON_CPU_MESSAGE, options
    assert not (tmp_path / "never").exists()


def test_philox_on_a_cpu_without_triton_interpret_runs_or_says_so_in_one_line(models, tmp_path):
    """Plainly started, the planner selects the interpreter before a model build imports triton; with
    triton imported first, --noise philox and --backend compiled stop with the same one line."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine compiles the kernels")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "2",
            "--classes", "cat", "--device", "cpu", "--quiet"]
    script = (
        "import sys\n"
        "from igds_fast.cli import main\n"
        f"args = {args!r}\n"
        f"print(main(args + ['--noise', 'philox', '--out', {str(tmp_path / 'plain')!r}]))\n"
        "import os, triton\n"
        "del os.environ['TRITON_INTERPRET']\n"  # as if triton had been imported before the kernels
        f"print(main(args + ['--noise', 'philox', '--out', {str(tmp_path / 'a')!r}]))\n"
        f"print(main(args + ['--backend', 'compiled', '--out', {str(tmp_path / 'b')!r}]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    codes = [line for line in result.stdout.splitlines() if line.isdigit()]
    assert codes == ["0", "2", "2"], result.stdout + result.stderr[-3000:]
    assert (tmp_path / "plain" / "cat" / "00000.png").is_file()
    errors = [line for line in result.stderr.splitlines() if line.startswith("igds-fast: error:")]
    assert errors == [f"igds-fast: error: {TRITON_ON_CPU_MESSAGE}"] * 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_the_manifest_records_only_the_settings_that_apply_and_the_versions(models, tmp_path):
    from importlib.metadata import version

    from igds_fast.distill.manifest import build_manifest

    plan = plan_distill(make_config(models, tmp_path / "out", ipc=1, steps=None, noise=None))
    manifest = build_manifest(plan, 0, 0, 0.0, 0.0, False)
    settings = manifest["settings"]
    for absent in ("noise_schedule", "diffusers", "vae", "cfg_scale", "cfg_channels", "prior_class_names"):
        assert absent not in settings["models"], absent
    for absent in ("progress", "force", "profile_steps"):
        assert absent not in settings["run"], absent
    assert "beta_table" not in settings and "selection" not in settings and "compile" not in settings["backend"]
    assert settings["sampler"]["steps"] == 250 and settings["backend"]["noise"] == "torch"
    assert settings["job"]["composite"] == 1
    assert settings["guidance"]["head"] == "autograd" and settings["backend"]["batch_invariant"] is False
    assert settings["models"]["prior"] == os.path.abspath(models["prior"])
    compiled = build_manifest(plan_distill(make_config(models, tmp_path / "out", ipc=1, backend__name="compiled")),
                              0, 0, 0.0, 0.0, False)["settings"]
    assert "head" not in compiled["guidance"] and "batch_invariant" not in compiled["backend"]
    assert compiled["backend"]["noise"] == "philox" and compiled["backend"]["compile"]["dtype"] == "bf16"
    versions = manifest["versions"]
    assert versions["triton"] == version("triton") and versions["torch"] == torch.__version__
    try:
        assert versions["diffusers"] == version("diffusers")
    except ImportError:  # importlib.metadata.PackageNotFoundError
        assert versions["diffusers"] is None
    assert versions["cuda"] is None and versions["cudnn"] is None and versions["gpu"] is None  # a CPU run


def test_a_full_disk_stops_in_one_line_and_the_rerun_resumes_byte_identically(models, tmp_path, monkeypatch, capsys):
    reference = tmp_path / "reference"
    assert _run(_small_args(models, reference)) == 0
    out = tmp_path / "full"
    real_fdopen = os.fdopen
    budget = {"files": 4}  # .igds_config.json and 3 images fit; the 4th (mid-batch) finds the disk full

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = real_fdopen(fd, mode, *args, **kwargs)
        if "w" not in mode or str(out) not in os.readlink(f"/proc/self/fd/{fd}"):
            return handle
        budget["files"] -= 1
        return handle if budget["files"] >= 0 else FullDisk(handle)

    monkeypatch.setattr(os, "fdopen", fdopen)
    capsys.readouterr()
    assert cli.main(["distill", *_small_args(models, out)]) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("igds-fast: error:")]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and errors[0].startswith("igds-fast: error: no space left on the device holding "), errors
    assert str(out) in errors[0] and "rerun the same command: it resumes" in errors[0]
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    written = {path: data for path, data in listing(out).items() if path.endswith(".png")}
    assert len(written) == 3 and all(listing(reference)[path] == data for path, data in written.items())
    assert not [name for _, _, names in os.walk(out) for name in names if name.endswith(".tmp")]
    assert not (out / "manifest.json").exists()
    assert _run(_small_args(models, out)) == 0
    assert listing(out) == listing(reference)


def test_the_demo_writes_its_sets_and_table_under_out_and_force_clears_only_its_files(tmp_path):
    from igds_fast.presets.digits_files import note_file

    out, work = tmp_path / "out", tmp_path / "work"
    (out / "distilled").mkdir(parents=True)
    (out / "distilled" / "stale").write_text("x")  # the user's, under the demo's distilled/
    (out / "keep.txt").write_text("mine")
    (out / "results.txt").write_text("old")
    note_file(str(out), "results.txt")  # the demo's own (its record names it with these bytes)
    (work / "distilled").mkdir(parents=True)
    digits.clear_work_dir(str(work), str(out))
    # By the demo's record only (tests/test_refusals_data_loss.py has the full case): never by name.
    assert sorted(os.listdir(out)) == ["distilled", "keep.txt"] and os.listdir(out / "distilled") == ["stale"]
    assert (work / "distilled").exists()


def test_a_beta_table_that_cannot_serve_the_run_is_refused_before_any_training(no_demo_run, tmp_path, capsys):
    """The parser's reason reaches the user (argparse alone prints "invalid ... value"), and a table
    without an entry for the run's smallest IPC stops at the command line, not after the VE and two
    sets are made."""
    negative, only_ten = tmp_path / "negative.json", tmp_path / "ten.json"
    negative.write_text(json.dumps({"beta_per_ipc": {"1": -0.5}}))
    only_ten.write_text(json.dumps({"beta_per_ipc": {"10": 0.2}}))
    for table, reason in ((negative, ">= 0"), (tmp_path / "missing.json", "not found")):
        assert cli.main(["demo", "digits", "--beta-table", str(table)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and "invalid" not in err, err
    with pytest.raises(IGDSInputError, match=r"no entry for IPC 1 .*covers \[10\]"):
        _run(["--beta-table", str(only_ten)])
