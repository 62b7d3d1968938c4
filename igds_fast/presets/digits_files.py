"""What the digits demo wrote, by its own record: the check before it writes, and what --force removes.

The demo writes, in --work-dir (WORK): ve.safetensors and ve_train.json, and prior.safetensors when
it trains its own prior; in --out (OUT, default WORK): results.json, results.txt and the distilled
sets OUT/distilled/<method>_ipc<k>_seed<s>/ (igds_s3's candidates beside them, in
<set>.s3-candidates/), each an ordinary distill folder with its own record (distill/owned.py).

Each of the two folders keeps the demo's record, FOLDER/.igds_demo.json: every file the demo wrote
there, with its size and sha256 once written, and every set folder it made. A file is the demo's
only when the record lists it with those bytes, or as being written (the record says so before the
write, so a run stopped between the write and the digest does not disown its own file); anything else
is the user's. So:

* before any work, a file at one of the demo's names that is not its own (a ve.safetensors of the
  user's, a results.json the user edited) is refused in one line naming it, and so is a set folder
  the demo did not make: the demo would overwrite them or read them as its cache;
* --force removes the demo's own files and the sets it made -- each set by its own record, a set
  holding anything distill did not write refused, named -- all decided before the first removal,
  after every input is checked; nothing else in WORK or OUT is touched.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os

from ..distill.owned import clear, foreign_refusal, read_settings, survey
from ..errors import IGDSInputError
from ..imageio import write_json_atomic
from ..locks import hold_folder

RECORD_NAME = ".igds_demo.json"
RECORD_FORMAT = "igds_demo_record"
SETS_DIR = "distilled"


def _digest(path: str) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def read_record(folder: str) -> dict:
    """{"files": {name: {"size", "sha256"}}, "sets": [name]} of FOLDER (empty without a record)."""
    empty = {"format": RECORD_FORMAT, "files": {}, "sets": []}
    try:
        with open(os.path.join(folder, RECORD_NAME), encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        return empty
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise IGDSInputError(f"{os.path.join(folder, RECORD_NAME)} (the demo's record of its files) is unreadable; "
                             "move the folder away or choose another one") from None
    if (not isinstance(record, dict) or record.get("format") != RECORD_FORMAT
            or not isinstance(record.get("files"), dict) or not isinstance(record.get("sets"), list)):
        raise IGDSInputError(f"{os.path.join(folder, RECORD_NAME)} is not the demo's record of its files; "
                             "move the folder away or choose another one")
    return record


def _write_record(folder: str, record: dict) -> None:
    path = os.path.join(folder, RECORD_NAME)
    if record["files"] or record["sets"]:
        write_json_atomic(path, record)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def owns(folder: str, name: str, record: dict | None = None) -> bool:
    """Whether FOLDER/name is a file the demo wrote, with the bytes it wrote."""
    record = read_record(folder) if record is None else record
    entry = record["files"].get(name)
    path = os.path.join(folder, name)
    if entry is None or os.path.islink(path) or not os.path.isfile(path):
        return False
    if entry.get("writing"):  # stopped between the atomic write and its digest: the old or the new bytes
        return True
    return os.path.getsize(path) == entry.get("size") and _digest(path) == entry


def note_file(folder: str, name: str) -> None:
    """Record FOLDER/name (just written by the demo) as the demo's, with its bytes' digest."""
    record = read_record(folder)
    record["files"][name] = _digest(os.path.join(folder, name))
    _write_record(folder, record)


@contextlib.contextmanager
def writing_file(folder: str, name: str):
    """Around the demo's (atomic) write of FOLDER/name: recorded as being written first, then with the
    new bytes' digest. The name was checked to be free or the demo's own before the run started."""
    record = read_record(folder)
    record["files"][name] = {"writing": True}
    _write_record(folder, record)
    yield os.path.join(folder, name)
    note_file(folder, name)


def note_set(folder: str, name: str) -> None:
    """Record the set folder FOLDER/distilled/name as the demo's (before it writes into it)."""
    record = read_record(folder)
    if name not in record["sets"]:
        record["sets"].append(name)
        _write_record(folder, record)


def check_demo_names(folder: str, flag: str, names: list[str], sets: list[str]) -> None:
    """Refuse, naming it, a file at one of `names` that is not the demo's own (recorded, unchanged),
    a folder at one of the set names `sets` (under distilled/) that the demo did not make, and a file
    distill did not write inside one it made (the demo clears a set whose settings changed)."""
    record = read_record(folder)
    for name in names:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not owns(folder, name, record):
            raise IGDSInputError(f"{path} was not written by the digits demo (it is not in its record {RECORD_NAME}, "
                                 f"or changed since); the demo would replace it: move it away or choose another {flag}")
    for name in sets:
        path = os.path.join(folder, SETS_DIR, name)
        if os.path.lexists(path) and (name not in record["sets"] or os.path.islink(path)):
            raise IGDSInputError(f"{path} is not a set the digits demo made; the demo would write into it: move it "
                                 f"away or choose another {flag}")
        if os.path.isdir(path) and not os.path.islink(path):  # a set of the demo's: it may clear it (other settings)
            contents = survey(path, read_settings(path))
            if contents.foreign:
                raise foreign_refusal(path, contents)


def demo_folders(work_dir: str, out_dir: str | None) -> list[tuple[str, str]]:
    """[(folder, flag)]: WORK, and OUT when it is another folder."""
    folders = [(work_dir, "--work-dir")]
    if out_dir is not None and os.path.realpath(out_dir) != os.path.realpath(work_dir):
        folders.append((out_dir, "--out"))
    return folders


def clear_demo(work_dir: str, out_dir: str | None = None) -> None:
    """--force: remove what the demo wrote in WORK and OUT (by their records), and nothing else.

    Every folder's clearing is decided (and any refusal raised) before the first file is removed;
    WORK, OUT and every set are locked meanwhile.
    """
    folders = demo_folders(work_dir, out_dir)
    with contextlib.ExitStack() as held:
        for folder, flag in folders:
            held.enter_context(hold_folder(folder, flag))
        clearings = [DemoClearing(folder, held, flag) for folder, flag in folders]
        for clearing in clearings:
            clearing.apply()
    for clearing in clearings:  # the sets' locks are released: their emptied folders can go
        clearing.tidy()


class DemoClearing:
    """What --force removes in one folder, decided whole before anything is removed.

    Built holding the folder's lock and each set's (`held`): the demo's own files (recorded,
    unchanged) and the set folders it made, each by its own distill record; a set holding anything
    distill did not write is refused, naming it. `apply()` removes them (still under the locks);
    `tidy()`, after the locks are released, removes the emptied set folders and distilled/.
    """

    def __init__(self, folder: str, held: contextlib.ExitStack, flag: str):
        self.folder = folder
        self.record = read_record(folder)
        self.files = [name for name in self.record["files"] if owns(folder, name, self.record)]
        self.sets = []
        for name in self.record["sets"]:
            path = os.path.join(folder, SETS_DIR, name)
            if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
                raise IGDSInputError(f"{path} is no longer the set folder the digits demo made; move it away or "
                                     f"choose another {flag}")
            if not os.path.isdir(path):
                continue
            held.enter_context(hold_folder(path, flag))
            contents = survey(path, read_settings(path))
            if contents.foreign:
                raise foreign_refusal(path, contents)
            self.sets.append((path, contents))

    def apply(self) -> None:
        for name in self.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.folder, name))
        for path, contents in self.sets:
            clear(path, contents)
        kept = {name: entry for name, entry in self.record["files"].items() if name not in self.files}
        _write_record(self.folder, {**self.record, "files": kept, "sets": []})

    def tidy(self) -> None:
        for path, _ in self.sets:
            _remove_if_empty(path)
        if self.sets:  # distilled/ held the demo's sets: gone with them when nothing else is left
            _remove_if_empty(os.path.join(self.folder, SETS_DIR))


def _remove_if_empty(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


__all__ = ["DemoClearing", "RECORD_NAME", "SETS_DIR", "check_demo_names", "clear_demo", "demo_folders", "note_file", "note_set", "owns", "read_record", "writing_file"]
