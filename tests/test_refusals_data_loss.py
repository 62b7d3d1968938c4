"""Data loss (issue 26): what igds_fast refuses so that no user file is lost, each repro made small.

--force removes only what the tool wrote (by the folder's record), decided after every input is
checked; folders never overlap, / and home never qualify; one writer per folder (an OS lock, taken
over after SIGKILL; torchrun ranks share it); outputs never over an input; a resume checks the
images it counts. Every refusal is one line (exit 2) and leaves every user file in place.
"""
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from factories import write_tiny_prior_and_ve
from test_distill_torchrun import ENV, torchrun_command
from igds_fast import cli
from igds_fast.distill import CONFIG_NAME
from igds_fast.distill.owned import png_defect
from igds_fast.errors import IGDSInputError
from igds_fast.imageio import save_png_atomic
from igds_fast.locks import LOCK_NAME, hold_folder
from igds_fast.presets import digits
from igds_fast.presets.digits_files import RECORD_NAME, note_file, note_set

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ("cat", "dog")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    prior, ve = write_tiny_prior_and_ve(tmp_path_factory.mktemp("models"), CLASSES)
    return {"prior": prior, "ve": ve}


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real ImageFolder of the run's classes (3 PNGs each) and an unrelated class."""
    root = tmp_path_factory.mktemp("real")
    generator = torch.Generator().manual_seed(3)
    for name in (*CLASSES, "airplane"):
        os.makedirs(root / name)
        for index in range(3):
            save_png_atomic(root / name / f"{index:05d}.png", torch.rand(3, 16, 16, generator=generator) * 2 - 1)
    return root


def tree(folder) -> dict:
    """{relative path: bytes} of every file under `folder` (symlinks as their target text)."""
    files = {}
    for root, dirs, names in os.walk(folder):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = os.path.join(root, name)
            key = os.path.relpath(path, folder)
            files[key] = ("link:" + os.readlink(path)).encode() if os.path.islink(path) else open(path, "rb").read()
    return files


def copy_tree(source, target):
    for relative, data in tree(source).items():
        os.makedirs(os.path.dirname(os.path.join(target, relative)), exist_ok=True)
        with open(os.path.join(target, relative), "wb") as handle:
            handle.write(data)


def distill_argv(models, out, *extra, ipc=1, seed=0, steps=2, quiet=True):
    argv = ["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", ipc, "--composite", "1",
            "--batch-size", "2", "--steps", steps, "--seed", seed, "--out", out, "--device", "cpu",
            *(["--quiet"] if quiet else []), *extra]
    return [str(arg) for arg in argv]


def refused(argv, capsys, *fragments) -> str:
    """Run `igds-fast ARGV`: exit 2 with one line on stderr holding every fragment; returns the line."""
    capsys.readouterr()  # what earlier runs printed
    assert cli.main([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("igds-fast: error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


# ---- 1. the demo's --force ------------------------------------------------------------------------


@pytest.fixture
def no_demo_run(monkeypatch):
    """The demo must stop before its work: running it fails the test."""
    monkeypatch.setattr(digits, "_run_digits", lambda *args: pytest.fail("the demo ran"))


def test_demo_force_with_a_bad_device_removes_nothing(tmp_path, capsys, no_demo_run):
    work, out = tmp_path / "W", tmp_path / "O"
    for path in (work / "distilled" / "mine" / "keep.txt", out / "distilled" / "mine2" / "keep.txt",
                 work / "ve.safetensors", out / "results.json"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    before = {**tree(work), **{"O/" + k: v for k, v in tree(out).items()}}
    refused(["distill", "--work-dir", work, "--out", out, "--force", "--device", "nosuchdevice", "--quiet"], capsys,
            "unknown device 'nosuchdevice'")
    assert {**tree(work), **{"O/" + k: v for k, v in tree(out).items()}} == before


def _demo_files(work, out):
    """A work dir and an output folder as the demo leaves them, with the user's files beside."""
    (work / "distilled" / "mine").mkdir(parents=True)
    (work / "distilled" / "mine" / "keep.txt").write_text("the user's")
    (out / "distilled" / "mine2").mkdir(parents=True)
    (out / "distilled" / "mine2" / "keep.txt").write_text("the user's")
    (work / "notes.txt").write_text("the user's")
    (work / "ve.safetensors").write_bytes(b"the demo's VE")
    note_file(str(work), "ve.safetensors")
    (out / "results.json").write_text("{}")
    note_file(str(out), "results.json")
    made = out / "distilled" / "igds_ipc1_seed0"  # a set the demo made: a distill folder with its record
    note_set(str(out), "igds_ipc1_seed0")
    (made / "0").mkdir(parents=True)
    save_png_atomic(made / "0" / "00000.png", torch.zeros(1, 16, 16))
    (made / CONFIG_NAME).write_text(json.dumps({"classes": ["0"], "ipc": 1}))
    (made / "manifest.json").write_text("{}")
    return made


def test_demo_force_removes_only_what_the_demo_wrote(tmp_path, monkeypatch):
    work, out = tmp_path / "W", tmp_path / "O"
    made = _demo_files(work, out)
    ran = []
    monkeypatch.setattr(digits, "_run_digits", lambda *args: ran.append(args) or {})
    settings = digits.DigitsSettings.fast(ipcs=(1,), seeds=1)
    digits.run_digits(settings, str(work), lambda message: None, out_dir=str(out), force=True)
    assert ran  # the run goes on after the clearing
    assert tree(work) == {"distilled/mine/keep.txt": b"the user's", "notes.txt": b"the user's"}
    assert tree(out) == {"distilled/mine2/keep.txt": b"the user's"}
    assert not made.exists() and not (out / RECORD_NAME).exists()


def test_demo_refuses_files_at_its_names_it_did_not_write_before_removing_anything(tmp_path, no_demo_run):
    work, out = tmp_path / "W", tmp_path / "O"
    _demo_files(work, out)
    settings = digits.DigitsSettings.fast(ipcs=(1,), seeds=1)

    def run():
        digits.run_digits(settings, str(work), lambda message: None, out_dir=str(out), force=True)

    cases = [
        # the user's own file where the demo writes its results (no record of it)
        (lambda: (out / "results.txt").write_text("the user's"), "results.txt was not written by the digits demo"),
        # a file the demo wrote, changed by the user since
        (lambda: (work / "ve.safetensors").write_bytes(b"edited"), "ve.safetensors was not written by the digits demo"),
        # a set folder the demo did not make, at a name it writes
        (lambda: (out / "distilled" / "ddpm_ipc1_seed0").mkdir(), "ddpm_ipc1_seed0 is not a set the digits demo made"),
        # a set the demo made, holding the user's file
        (lambda: (out / "distilled" / "igds_ipc1_seed0" / "0" / "mine.png").write_bytes(b"x"),
         "also holds 0/mine.png"),
    ]
    for plant, message in cases:
        state_work, state_out = tree(work), tree(out)
        plant()
        planted_work, planted_out = tree(work), tree(out)
        with pytest.raises(IGDSInputError, match=message) as info:
            run()
        assert "\n" not in str(info.value)
        assert tree(work) == planted_work and tree(out) == planted_out  # nothing removed
        for folder, state in ((work, state_work), (out, state_out)):  # undo the plant for the next case
            for relative in set(tree(folder)) - set(state):
                os.unlink(folder / relative)
            for relative, data in state.items():
                (folder / relative).write_bytes(data)
        for stray in (out / "distilled" / "ddpm_ipc1_seed0",):
            if stray.exists():
                stray.rmdir()


def test_a_demo_stopped_between_a_write_and_its_record_still_owns_the_file(tmp_path):
    """Killed after the atomic rename and before the digest was recorded: the file holds new bytes the
    record does not know. The rerun must reuse or replace it (the Ctrl-C line promises a rerun works),
    not refuse it as the user's; a finished write is recorded with its new digest."""
    from igds_fast.presets.digits_files import check_demo_names, owns, writing_file
    from igds_fast.imageio import write_bytes_atomic

    write_bytes_atomic(str(tmp_path / "results.json"), b"old")
    note_file(str(tmp_path), "results.json")

    class Killed(BaseException):
        pass

    with pytest.raises(Killed):
        with writing_file(str(tmp_path), "results.json") as path:
            write_bytes_atomic(path, b"new bytes")
            raise Killed  # SIGKILL here: renamed, digest not recorded
    check_demo_names(str(tmp_path), "--out", ["results.json"], [])  # not refused
    assert owns(str(tmp_path), "results.json")
    with writing_file(str(tmp_path), "results.json") as path:
        write_bytes_atomic(path, b"newest")
    (tmp_path / "results.json").write_bytes(b"edited by the user")  # a finished write's record is exact again
    with pytest.raises(IGDSInputError, match="was not written by the digits demo"):
        check_demo_names(str(tmp_path), "--out", ["results.json"], [])


def test_demo_folders_apart_and_not_home(tmp_path, monkeypatch, capsys, no_demo_run):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "W"
    refused(["demo", "digits", "--work-dir", work, "--out", work / "inside", "--quiet"], capsys,
            "lies inside --work-dir")
    refused(["demo", "digits", "--work-dir", home, "--quiet"], capsys, "is your home folder")
    refused(["demo", "digits", "--work-dir", work, "--out", "/", "--quiet"], capsys, "is the root folder")
    assert not work.exists()


# ---- 2. S³: --candidates / --out / --real ---------------------------------------------------------


def s3_argv(models, real, out, *extra):
    return distill_argv(models, out, "--select", "s3", "--groups", "2", "--real", real, *extra)


def test_s3_force_never_clears_the_real_images_or_an_image_folder(models, real, tmp_path, monkeypatch, capsys):
    copy = tmp_path / "R"
    copy_tree(real, copy)
    other = tmp_path / "imagefolder"
    copy_tree(real, other)
    before = {"R": tree(copy), "other": tree(other)}
    out = tmp_path / "out"
    refused(s3_argv(models, copy, out, "--candidates", copy, "--force"), capsys, "--candidates", "--real",
            "same path")
    refused(s3_argv(models, copy, copy, "--force"), capsys, "--out", "--real", "same path")
    refused(s3_argv(models, copy, copy / "cat", "--force"), capsys, "lies inside --real")
    refused(s3_argv(models, copy, out, "--candidates", "/", "--force"), capsys, "--candidates / is the root folder")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    refused(s3_argv(models, copy, out, "--candidates", home, "--force"), capsys, "is your home folder")
    link = tmp_path / "link_to_R"
    os.symlink(copy, link)
    refused(s3_argv(models, link, out, "--candidates", copy, "--force"), capsys, "same path")
    # any ImageFolder as --candidates: not a folder distill wrote, so --force does not clear it
    refused(s3_argv(models, copy, out, "--candidates", other, "--force"), capsys,
            "not empty and was not written by distill", "airplane")
    assert {"R": tree(copy), "other": tree(other)} == before
    assert not out.exists() and not os.path.exists(f"{out}.s3-candidates")


def test_s3_refuses_a_candidates_folder_with_foreign_files_before_touching_out(models, real, tmp_path, capsys):
    out, candidates = tmp_path / "out", tmp_path / "cands"
    assert cli.main(s3_argv(models, real, out, "--candidates", candidates)) == 0
    capsys.readouterr()
    (candidates / "cat" / "notes.txt").write_text("the user's")
    before = {"out": tree(out), "cands": tree(candidates)}
    # other settings with --force: OUT could be cleared, the candidates cannot: nothing is removed from either
    refused(s3_argv(models, real, out, "--candidates", candidates, "--force", "--seed", "1"), capsys,
            f"{candidates} also holds cat/notes.txt")
    assert {"out": tree(out), "cands": tree(candidates)} == before


# ---- 3. --force on folders distill did not write --------------------------------------------------


def test_force_never_empties_folders_distill_did_not_write(models, real, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    copy_tree(real, foreign)  # cat/, dog/ (the run's classes), airplane/ (unrelated), no settings file
    before = tree(foreign)
    refused(distill_argv(models, foreign, "--force"), capsys, "not empty and was not written by distill",
            "it holds airplane")
    assert tree(foreign) == before
    # A distill folder with the user's files beside distill's: --force with other settings removes nothing.
    mine = tmp_path / "mine"
    assert cli.main(distill_argv(models, mine, ipc=2)) == 0
    copy_tree(real / "airplane", mine / "airplane")
    (mine / "dog" / "keep.png").write_bytes(b"the user's")
    before = tree(mine)
    line = refused(distill_argv(models, mine, "--force", seed=1), capsys, "--force removes only what distill wrote",
                   "airplane", "and 1 more")
    assert tree(mine) == before, line
    # Without them, --force removes exactly the recorded files (and the IPC-2 images of the old run).
    for relative in ("dog/keep.png",):
        os.unlink(mine / relative)
    for name in os.listdir(mine / "airplane"):
        os.unlink(mine / "airplane" / name)
    os.rmdir(mine / "airplane")
    assert cli.main(distill_argv(models, mine, "--force", seed=1)) == 0
    assert sorted(p for p in tree(mine) if p.endswith(".png") and p != "preview.png") == ["cat/00000.png",
                                                                                         "dog/00000.png"]
    assert json.loads((mine / CONFIG_NAME).read_text())["seed"] == 1


def test_force_never_clears_through_a_symlinked_class_folder(models, real, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(distill_argv(models, out)) == 0
    elsewhere = tmp_path / "elsewhere"
    copy_tree(real / "cat", elsewhere)
    for name in os.listdir(out / "cat"):
        os.unlink(out / "cat" / name)
    os.rmdir(out / "cat")
    os.symlink(elsewhere, out / "cat")  # the recorded class folder is now a link to the user's images
    before = tree(elsewhere)
    refused(distill_argv(models, out, "--force", seed=1), capsys, "also holds cat")
    assert tree(elsewhere) == before


def test_output_folder_is_never_root_or_home(models, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("the user's")
    monkeypatch.setenv("HOME", str(home))
    refused(distill_argv(models, "/", "--force"), capsys, "--out / is the root folder")
    refused(distill_argv(models, home, "--force"), capsys, "is your home folder")
    assert tree(home) == {"keep.txt": b"the user's"}


# ---- 4. one writer per folder ---------------------------------------------------------------------


def _wait_for(condition, what: str, process=None, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        try:
            if condition():
                return
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(models, tmp_path, capsys):
    out = tmp_path / "X"
    # The first writer: `distill --seed 0 --out X &`, long enough to be caught writing.
    holder = subprocess.Popen([sys.executable, "-m", "igds_fast", *distill_argv(models, out, ipc=8, steps=60)],
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (out / LOCK_NAME).read_text().split(" ")[0] == str(holder.pid), "the lock", holder)
        _wait_for(lambda: json.loads((out / CONFIG_NAME).read_text()), "the settings file", holder)
        # The second: `distill --seed 1 --force --out X`, refused in one line naming the holder.
        refused(distill_argv(models, out, "--force", seed=1), capsys,
                f"{out} is being written by process {holder.pid} (started ")
        assert json.loads((out / CONFIG_NAME).read_text())["seed"] == 0  # the second writer changed nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert (out / LOCK_NAME).read_text().startswith(f"{holder.pid} ")  # left behind by the killed holder
    # The kernel released it with the process: the next run takes it over, says so, and finishes.
    assert cli.main(distill_argv(models, out, "--force", seed=1, quiet=False)) == 0
    assert f"taking over the lock of process {holder.pid}" in capsys.readouterr().err
    assert json.loads((out / CONFIG_NAME).read_text())["seed"] == 1
    images = sorted(p for p in tree(out) if p.endswith(".png") and p != "preview.png")
    assert images == ["cat/00000.png", "dog/00000.png"]  # none of the seed-0 images is left
    assert not (out / LOCK_NAME).exists()  # released: removed


def test_the_lock_is_reentrant_in_a_process_and_leaves_no_trace(tmp_path):
    folder = tmp_path / "new"
    with hold_folder(str(folder)):
        assert (folder / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")
        with hold_folder(str(folder)):
            pass
        assert (folder / LOCK_NAME).exists()  # still held by the outer block
    assert not folder.exists()  # it made the folder, which stayed empty: removed with the lock


def test_torchrun_ranks_share_the_lock_and_a_held_folder_is_refused_once(models, tmp_path):
    out = tmp_path / "shared"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from igds_fast.locks import hold_folder\n"
                               "with hold_folder(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
                               str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = subprocess.run(torchrun_command(2, distill_argv(models, out)[1:]), env=ENV, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode != 0
        assert result.stderr.count(f"is being written by process {holder.pid}") == 1, result.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    # Two ranks under one lock (rank 0's): the run completes and leaves no lock behind.
    result = subprocess.run(torchrun_command(2, distill_argv(models, out, ipc=2)[1:]), env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["run"]["world_size"] == 2 and len(manifest["images"]) == 4
    assert not (out / LOCK_NAME).exists()


# ---- 5, 8, 9. outputs never over an input; a resume checks what it counts --------------------------


@pytest.fixture
def finished(models, tmp_path):
    out = tmp_path / "OUT"
    assert cli.main(distill_argv(models, out, ipc=2)) == 0
    return out


def test_export_npz_never_writes_into_its_input_or_over_a_file(finished, tmp_path, capsys):
    before = tree(finished)
    refused(["export-npz", finished, "--out", finished / "cat" / "00000.png"], capsys, "lies inside DISTILLED_DIR")
    refused(["export-npz", finished, "--out", finished / "samples.npz", "--force"], capsys, "lies inside DISTILLED_DIR")
    assert tree(finished) == before
    existing = tmp_path / "mine.npz"
    existing.write_bytes(b"the user's")
    refused(["export-npz", finished, "--out", existing], capsys, "exists; use --force to replace it")
    assert existing.read_bytes() == b"the user's"
    assert cli.main(["export-npz", str(finished), "--out", str(existing), "--force"]) == 0
    with np.load(existing) as archive:
        assert archive["arr_0"].shape == (4, 16, 16, 3)
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_export_npz_reads_only_the_folders_own_images(finished, real, tmp_path, capsys):
    manifest_path = finished / "manifest.json"
    original = json.loads(manifest_path.read_text())
    os.symlink(real / "airplane" / "00000.png", finished / "cat" / "link.png")
    for outside in (str(real / "airplane" / "00000.png"), "../../real/airplane/00000.png", "cat/../../x.png",
                    "cat/link.png"):
        manifest = json.loads(json.dumps(original))
        manifest["images"][1]["path"] = outside
        manifest_path.write_text(json.dumps(manifest))
        refused(["export-npz", finished, "--out", tmp_path / "x.npz"], capsys, "outside", "export-npz reads only")
        assert not (tmp_path / "x.npz").exists()


def test_a_resume_remakes_images_that_are_not_whole_pngs(models, finished, tmp_path, capsys):
    reference = tree(finished)
    with open(finished / "cat" / "00001.png", "r+b") as handle:  # truncated
        handle.truncate(os.path.getsize(finished / "cat" / "00001.png") // 2)
    with zipfile.ZipFile(finished / "dog" / "00000.png", "w") as archive:  # overwritten by another tool's output
        archive.writestr("arr_0.npy", b"0")
    damaged = bytearray(reference["dog/00001.png"])  # one flipped bit inside a chunk
    damaged[60] ^= 0x01
    (finished / "dog" / "00001.png").write_bytes(bytes(damaged))
    for path, expected in (("cat/00001.png", "truncated"), ("dog/00000.png", "not a PNG"),
                           ("dog/00001.png", "chunk checksum")):
        assert expected in png_defect(str(finished / path))
    assert png_defect(str(finished / "cat" / "00000.png")) is None
    assert cli.main(distill_argv(models, finished, ipc=2, quiet=False)) == 0
    captured = capsys.readouterr()
    assert "3 existing image(s)" in captured.err and "made again" in captured.err
    assert "3 written this run" in captured.out
    after = tree(finished)
    after.pop("manifest.json"), reference.pop("manifest.json")
    assert after == reference  # the uninterrupted run's bytes


def test_file_outputs_of_the_other_commands_never_land_in_their_inputs(real, tmp_path, capsys):
    ve = tmp_path / "ve.safetensors"
    ve.write_bytes(b"a VE")
    val = tmp_path / "val"
    copy_tree(real, val)
    before = {"real": tree(real), "val": tree(val)}
    refused(["train-ve", "--data", real, "--out", real / "ve.safetensors"], capsys, "lies inside --data")
    refused(["train-ve", "--data", real, "--val", val, "--out", tmp_path / "v.safetensors", "--checkpoint",
             val / "cat" / "00000.png"], capsys, "--checkpoint", "lies inside --val")
    refused(["calibrate-beta", "--data", real, "--val", val, "--ve", ve, "--out", ve, "--ipc", "1", "--betas", "0"],
            capsys, "--out", "--ve", "same path")
    refused(["eval", "--train", real, "--val", val, "--out", val / "cat" / "00000.png"], capsys, "lies inside --val")
    refused(["eval", "--train", real, "--val", val, "--out", real / "results.json"], capsys, "lies inside --train")
    refused(["train-prior", "--data", real, "--out", real / "cat" / "prior.safetensors"], capsys, "lies inside --data")
    assert {"real": tree(real), "val": tree(val)} == before and ve.read_bytes() == b"a VE"
