"""Issue 26, "raw tracebacks" and "accepted but should not be": one line, exit 2, for what a user or a file causes.

Each repro of the issue, made small, through `igds_fast.cli.main`: exactly one stderr line starting
"igds-fast: error:" (or "igds-fast: interrupted:" and exit 130 for Ctrl-C), no traceback, and where
it matters nothing written and no training started. The translation lives in one place
(igds_fast/cli/__init__.py `main`: IGDSInputError, OSError, Pillow's decode errors, KeyboardInterrupt)
plus the early output checks (imageio.check_output_file / check_output_folder).
"""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from factories import tiny_ve, write_tiny_prior_and_ve
from igds_fast import cli
from igds_fast.cli import describe_os_error

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line(capsys, code, expected_code=2, prefix="igds-fast: error: ") -> str:
    """The one line the command ended with (a run's own log lines, "distill: ...", may come before it)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("igds-fast:") and not line.startswith("igds-fast: note:")]
    assert code == expected_code, err
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def models(tmp_path):
    prior, ve = write_tiny_prior_and_ve(tmp_path)
    return {"prior": prior, "ve": ve, "dir": tmp_path}


def distill(models, *extra, out=None):
    return cli.main(["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--steps", "2",
                     "--quiet", "--device", "cpu", "--out", str(out or models["dir"] / "out"), *extra])


def image_folder(root, classes=("cat", "dog"), per_class=3, size=(12, 12)) -> str:
    rng = np.random.default_rng(3)
    for name in classes:
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for index in range(per_class):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(os.path.join(root, name, f"{index}.png"))
    return str(root)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write in: mode 0555, or a read-only tmpfs where we run as root."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
        yield folder
        folder.chmod(stat.S_IRWXU)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("root without mount(8): no way to make a read-only folder here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the refusal")
    return fail


# ---- class names: a length and safe characters -------------------------------------------------------


def _ve_with_classes(models, names):
    ve = tiny_ve(num_classes=len(names))
    ve.class_names = list(names)
    ve.save(models["ve"])


@pytest.mark.parametrize("name, problem", [
    ("a" * 300, "300 bytes long (at most 128)"),  # was ENAMETOOLONG, leaving .igds_config.json in OUT
    ("cat\nfish", "control character U+000A"),
    ("cat\u202egod", "invisible formatting (e.g. a bidirectional override) character U+202E"),
])
def test_a_class_name_that_cannot_be_a_folder_is_refused_before_out_is_touched(models, capsys, name, problem):
    _ve_with_classes(models, [name, "dog"])
    line = one_line(capsys, distill(models))
    assert problem in line and "\n" not in line
    assert not (models["dir"] / "out").exists()


def test_train_ve_refuses_a_class_folder_named_with_a_newline_before_decoding(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "data", classes=("cat", "dog\u202e"))
    monkeypatch.setattr("igds_fast.cli.train_ve.FolderImages", never("decoding"))
    line = one_line(capsys, cli.main(["train-ve", "--data", data, "--out", str(tmp_path / "ve.safetensors")]))
    assert "'dog\\u202e' cannot be used: contains the invisible formatting" in line


# ---- folders: symbolic-link loops, names in other encodings ------------------------------------------


def test_a_symlink_loop_in_a_class_folder_is_an_unreadable_image(tmp_path, capsys, monkeypatch):
    data = image_folder(tmp_path / "data")
    loop = os.path.join(data, "cat", "loop.png")
    os.symlink(loop, loop)  # a link to itself: ELOOP on every stat
    monkeypatch.setattr("igds_fast.cli.train_ve.train_ve_from_source", never("training"))
    line = one_line(capsys, cli.main(["train-ve", "--data", data, "--out", str(tmp_path / "ve.safetensors"),
                                      "--resolution", "16", "--on-corrupt", "fail", "--quiet"]))
    assert loop in line and "Too many levels of symbolic links" in line
    # As a class folder of its own: one line naming it (eval, calibrate-beta, S3 --real scan the same way).
    os.remove(loop)
    os.symlink(os.path.join(data, "loopdir"), os.path.join(data, "loopdir"))
    for argv in (["train-ve", "--data", data, "--out", str(tmp_path / "ve.safetensors")],
                 ["eval", "--train", data, "--val", data, "--out", str(tmp_path / "r.json")]):
        line = one_line(capsys, cli.main(argv))
        assert "loopdir" in line and "symbolic-link loop" in line


def test_an_image_name_in_another_encoding_is_read_and_fingerprinted(tmp_path):
    from igds_fast.data import FolderImages

    data = image_folder(tmp_path / "data")
    odd = os.path.join(os.fsencode(data), b"cat", b"caf\xe9.png")  # Latin-1, not UTF-8
    Image.new("RGB", (12, 12), (200, 10, 10)).save(odd.decode("utf-8", "surrogateescape"))
    images = FolderImages(data, 12, num_workers=0)
    assert len(images) == 7 and len(images.fingerprint()) == 64  # was UnicodeEncodeError


def test_s3_reads_real_images_named_in_another_encoding(models, capsys, monkeypatch):
    monkeypatch.setenv("IGDS_DATA_WORKERS", "0")
    real = image_folder(models["dir"] / "real")
    Image.new("RGB", (12, 12)).save(os.path.join(os.fsencode(real), b"dog", b"\xff.png").decode("utf-8", "surrogateescape"))
    assert distill(models, "--select", "s3", "--groups", "2", "--real", real) == 0, capsys.readouterr().err
    assert len(list((models["dir"] / "out").rglob("0000*.png"))) == 2


# ---- --out: a dangling link, an existing folder, a read-only folder, a name too long -----------------


def _train_commands(tmp_path, models, out):
    data = image_folder(tmp_path / "data")
    return {
        "train-ve": ["train-ve", "--data", data, "--out", out, "--resolution", "16", "--quiet"],
        "calibrate-beta": ["calibrate-beta", "--data", data, "--val", data, "--ve", models["ve"], "--out", out,
                           "--ipc", "1", "--betas", "0", "--quiet"],
        "eval": ["eval", "--train", data, "--val", data, "--out", out, "--quiet", "--device", "cpu"],
    }


@pytest.fixture
def no_training(monkeypatch):
    monkeypatch.setattr("igds_fast.cli.train_ve.train_ve_from_source", never("training"))
    monkeypatch.setattr("igds_fast.cli.calibrate.calibrate_beta", never("calibration"))
    monkeypatch.setattr("igds_fast.cli.eval.evaluate_distilled", never("training"))


def test_an_existing_folder_as_out_is_refused_before_training(models, tmp_path, capsys, no_training):
    out = tmp_path / "existing"
    out.mkdir()
    for name, argv in _train_commands(tmp_path, models, str(out)).items():
        line = one_line(capsys, cli.main(argv))
        assert f"--out {out} is a folder; give the path of a file to write" in line, name


def test_a_dangling_symlink_as_out_is_refused(models, tmp_path, capsys, no_training):
    out = tmp_path / "link"
    os.symlink(tmp_path / "nowhere" / "x", out)
    for name, argv in _train_commands(tmp_path, models, str(out)).items():
        line = one_line(capsys, cli.main(argv))
        assert f"--out {out} is a symbolic link to" in line and "which does not exist" in line, name
    assert "is a symbolic link to" in one_line(capsys, distill(models, out=out))


def test_a_read_only_out_is_refused_before_any_work(models, tmp_path, capsys, no_training, read_only_folder):
    out = str(read_only_folder / "result")
    for name, argv in _train_commands(tmp_path, models, out).items():
        line = one_line(capsys, cli.main(argv))
        assert f"cannot write in {read_only_folder}" in line, name
    assert f"cannot write in {read_only_folder}" in one_line(capsys, distill(models, out=read_only_folder / "out"))
    distilled = models["dir"] / "distilled"
    assert distill(models, out=distilled) == 0
    capsys.readouterr()
    line = one_line(capsys, cli.main(["export-npz", str(distilled), "--out", out]))
    assert f"cannot write in {read_only_folder}" in line


def test_a_name_longer_than_the_file_system_allows_is_one_line(models, capsys):
    out = models["dir"] / ("x" * 300) / "out"
    line = one_line(capsys, distill(models, out=out))
    assert "File name too long (shorten the path: a name is longer than the file system allows)" in line


def test_describe_os_error_names_the_paths_and_the_reason():
    assert describe_os_error(OSError(errno.EROFS, "Read-only file system", "/a/b")) == \
        "'/a/b': Read-only file system (choose a folder on a writable file system)"
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")) == \
        "No space left on device (free space and rerun; nothing partial was kept)"
    assert describe_os_error(OSError(errno.EEXIST, "File exists", "/a", None, "/b")) == "'/a' -> '/b': File exists"


# ---- devices, Ctrl-C, corrupt outputs on resume ------------------------------------------------------


@pytest.mark.parametrize("device, expected", [("nosuchdevice", "unknown device 'nosuchdevice'"),
                                              ("cuda", "CUDA is not available")])
def test_a_device_this_machine_lacks_is_one_line(models, capsys, device, expected):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = cli.main(["distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc", "1", "--out",
                     str(models["dir"] / "out"), "--device", device])
    assert expected in one_line(capsys, code)


def test_ctrl_c_is_one_line_saying_the_folder_is_resumable_and_exits_130(models, capsys, monkeypatch):
    from igds_fast.sampling import Sampler

    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    line = one_line(capsys, distill(models), expected_code=130, prefix="igds-fast: interrupted: ")
    assert "resumable: rerun the same command" in line


def test_running_out_of_device_memory_is_one_line_naming_the_batch_size(models, capsys, monkeypatch):
    from igds_fast.sampling import Sampler

    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of "
                                 "79.1 GiB\nof which 1.2 GiB is free.")
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: (_ for _ in ()).throw(oom))
    line = one_line(capsys, distill(models), expected_code=2)
    assert "Tried to allocate 20.00 GiB" in line and "smaller --batch-size" in line
    monkeypatch.setattr(Sampler, "sample", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other RuntimeError keeps its traceback
        distill(models, out=models["dir"] / "out2")


def test_a_real_sigint_then_the_same_command_finishes_the_folder(models, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "igds_fast", "distill", "--prior", models["prior"], "--ve", models["ve"], "--ipc",
            "3", "--steps", "100", "--batch-size", "2", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(out.rglob("0*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)  # after the first batch: the run is in its second
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    lines = [line for line in err.splitlines() if line.startswith("igds-fast:")]
    assert lines == ["igds-fast: interrupted: the output folder keeps every finished image and is resumable: rerun "
                     "the same command"] and "Traceback" not in err
    kept = len(list(out.rglob("0*.png")))
    assert 1 <= kept < 6
    finished = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert len(list(out.rglob("0000*.png"))) == 6 and f"{6 - kept} written this run" in finished.stdout


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_png_in_out_on_resume_is_named_and_made_again(models, capsys, damage):
    """A resumed run verifies the PNGs it keeps: a broken one is named in one line and made again."""
    out = models["dir"] / "out"
    assert distill(models, out=out) == 0
    capsys.readouterr()
    png = out / "cat" / "00000.png"
    whole = png.read_bytes()
    if damage == "garbage":
        png.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    else:
        png.write_bytes(whole[:-30])
    (out / "manifest.json").unlink()
    assert distill(models, out=out) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "not whole PNGs" in line]
    assert len(said) == 1 and "cat/00000.png" in said[0] and "made again" in said[0]
    assert png.read_bytes() == whole  # the same seed makes the same image again
    assert (out / "manifest.json").is_file()


# ---- beta, the VE bundle's mode -------------------------------------------------------------------------


def test_a_negative_beta_is_refused_in_every_form(models, capsys, tmp_path):
    assert "guidance beta must be >= 0" in one_line(capsys, distill(models, "--beta", "-5"))
    table = tmp_path / "beta.json"
    table.write_text(json.dumps({"beta_per_ipc": {"1": -0.5}}))
    assert "beta for IPC 1 must be a finite number >= 0" in one_line(capsys, distill(models, "--beta-table", str(table)))
    data = image_folder(tmp_path / "data")
    code = cli.main(["calibrate-beta", "--data", data, "--val", data, "--ve", models["ve"], "--out",
                     str(tmp_path / "b.json"), "--ipc", "1", "--betas", "0,-1"])
    assert "beta must be a finite number >= 0" in one_line(capsys, code)
    code = cli.main(["demo", "digits", "--beta", "-5", "--out", str(tmp_path / "demo"), "--work-dir", str(tmp_path / "w")])
    assert "beta must be >= 0" in one_line(capsys, code)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_ve_bundle_follows_the_umask_like_every_other_artifact(tmp_path, umask):
    from igds_fast.imageio import write_json_atomic

    previous = os.umask(umask)
    try:
        tiny_ve().save(tmp_path / "ve.safetensors")
        write_json_atomic(tmp_path / "other.json", {})
    finally:
        os.umask(previous)
    mode = stat.S_IMODE(os.stat(tmp_path / "ve.safetensors").st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE(os.stat(tmp_path / "other.json").st_mode)


# ---- export-npz: its inputs ------------------------------------------------------------------------------


@pytest.fixture
def distilled(models, capsys):
    out = models["dir"] / "distilled"
    assert distill(models, out=out) == 0
    capsys.readouterr()
    return out


def _export(folder, out):
    return cli.main(["export-npz", str(folder), "--out", str(out)])


def _edit_manifest(folder, change):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def test_export_npz_refuses_a_folder_as_out_and_a_file_as_its_input(distilled, capsys, tmp_path):
    assert "is a folder; give the path of a file to write" in one_line(capsys, _export(distilled, tmp_path))
    line = one_line(capsys, _export(distilled / "manifest.json", tmp_path / "a.npz"))
    assert "is not a folder" in line


def test_export_npz_refuses_a_bad_manifest_in_one_line(distilled, capsys, tmp_path):
    out = tmp_path / "a.npz"
    manifest = distilled / "manifest.json"
    original = manifest.read_bytes()
    manifest.write_bytes(b'{"images": [')
    assert "manifest" in one_line(capsys, _export(distilled, out)) and not out.exists()
    manifest.write_bytes(original.replace(b'"images"', b'"images\xff"', 1))
    assert "is not UTF-8 text" in one_line(capsys, _export(distilled, out))
    manifest.write_bytes(original)
    _edit_manifest(distilled, lambda m: m["images"][1].pop("label"))
    assert "image entry 1 lacks 'label'" in one_line(capsys, _export(distilled, out))
    manifest.write_bytes(original)
    _edit_manifest(distilled, lambda m: m["images"][0].update(path="../../etc/passwd"))
    assert "export-npz reads only the folder's own images" in one_line(capsys, _export(distilled, out))
    manifest.write_bytes(original)
    (distilled / "notes.txt").write_text("not an image")
    _edit_manifest(distilled, lambda m: m["images"][1].update(path="notes.txt"))
    line = one_line(capsys, _export(distilled, out))
    assert "notes.txt is not a readable image" in line and not out.exists()
    assert [name for name in os.listdir(tmp_path) if name.endswith(".tmp")] == []


def test_export_npz_on_a_full_disk_is_one_line_and_keeps_nothing(distilled, capsys, tmp_path, monkeypatch):
    import zipfile

    class FullDisk(zipfile.ZipFile):
        def open(self, name, mode="r", **kwargs):
            handle = super().open(name, mode, **kwargs)
            if mode == "w":
                def write(data):
                    raise OSError(errno.ENOSPC, "No space left on device")
                handle.write = write
            return handle

    monkeypatch.setattr("igds_fast.npz.zipfile.ZipFile", FullDisk)
    out = tmp_path / "a.npz"
    line = one_line(capsys, _export(distilled, out))
    assert "No space left on device (free space and rerun; nothing partial was kept)" in line
    assert not out.exists() and [name for name in os.listdir(tmp_path) if name.startswith(".")] == []
