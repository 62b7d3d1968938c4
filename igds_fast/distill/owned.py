"""What distill wrote in a folder, by the folder's own record; the clearing of --force; the image check of a resume.

The record is the folder's settings file, OUT/.igds_config.json, written before any image. Its
`classes` and `ipc` name every image a run with those settings writes, OUT/<class>/<index:05d>.png,
and distill writes nothing else but the files it names itself (NAMED_FILES), the lock (.igds_lock,
igds_fast/locks.py), the atomic writers' temporary files of those names (.<name>.<random>.tmp, left
by a killed writer) and, in a candidates folder, the S³ stage files (.s3/). Anything else in the
folder -- another file, another folder, a symlink, a class folder or an index the record does not
name -- was not written by distill: it is never removed, and --force on a folder that holds one is
refused in one line naming it. A folder without a settings file holds nothing of distill's: a
non-empty one (hidden files aside) is refused, with or without --force.

Resume: an existing image is counted as done only when it is a whole PNG -- every chunk's CRC, the
IEND chunk last, and it decodes (`png_defect`); one that fails (truncated, overwritten, damaged) is
removed and made again, so the folder ends as an uninterrupted run's.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import IGDSInputError
from ..locks import LOCK_NAME
from .trace import TRACE_JSON, TRACE_PNG

CONFIG_NAME = ".igds_config.json"
BATCH_NAME = ".igds_batch.json"  # the batch size a gamma != 0 folder was started with (it couples batch members)
MANIFEST_NAME = "manifest.json"
PREVIEW_NAME = "preview.png"
NAMED_FILES = (CONFIG_NAME, BATCH_NAME, MANIFEST_NAME, PREVIEW_NAME, TRACE_JSON, TRACE_PNG)
# The S³ stage files of a candidates folder (distill/select_stage.py writes them).
STAGE_DIR = ".s3"
FEATURES_DIR = "features"
STAGE_FILES = ("state.json", "real_centroids.safetensors", "real_partial.safetensors", "selection.json")
_FEATURE_FILE = re.compile(r"\d{6}\.safetensors")
_IMAGE_FILE = re.compile(r"(\d{5})\.png")
# imageio.write_bytes_atomic's temporary name: tempfile.mkstemp(prefix="." + name + ".", suffix=".tmp").
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]{6,}\.tmp")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def temp_of(name: str) -> str | None:
    """The final name an atomic writer's temporary file stands for, or None."""
    match = _TEMP_FILE.fullmatch(name)
    return match.group("name") if match else None


def read_settings(out: str) -> dict | None:
    """OUT's recorded settings; None without a settings file; {"format": "unreadable"} when unreadable."""
    path = os.path.join(out, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {"format": "unreadable"}
    return saved if isinstance(saved, dict) else {"format": "unreadable"}


def recorded_images(settings: dict | None) -> tuple[list[str], int]:
    """(classes, ipc) the settings record names; ([], 0) when they name none that could be a folder."""
    if not isinstance(settings, dict):
        return [], 0
    classes, ipc = settings.get("classes"), settings.get("ipc")
    if (not isinstance(classes, list) or isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1
            or not all(isinstance(key, str) and key and not key.startswith(".") and os.sep not in key
                       and "/" not in key for key in classes)):
        return [], 0
    return list(classes), ipc


def image_paths(settings: dict | None) -> list[str]:
    """Every image the record names, relative to OUT (class-major)."""
    classes, ipc = recorded_images(settings)
    return [os.path.join(key, f"{index:05d}.png") for key in classes for index in range(ipc)]


@dataclass
class Contents:
    """A distill folder sorted by its record: relative paths, deepest folders first."""

    ours: list[str] = field(default_factory=list)  # files distill wrote (the lock aside: never cleared)
    folders: list[str] = field(default_factory=list)  # folders distill made (removed when empty)
    foreign: list[str] = field(default_factory=list)  # entries it did not write (files, folders, symlinks)


def _entries(folder: str) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except FileNotFoundError:  # removed while we looked (another rank's clearing): nothing there
        return []


def _plain_dir(entry: os.DirEntry) -> bool:
    return entry.is_dir(follow_symlinks=False)


def _plain_file(entry: os.DirEntry) -> bool:
    return entry.is_file(follow_symlinks=False)


def _sort_folder(out: str, relative: str, is_ours, contents: Contents) -> None:
    """Files of OUT/relative that is_ours(name) accepts (or their temp files) are ours; the rest foreign."""
    for entry in _entries(os.path.join(out, relative)):
        path = os.path.join(relative, entry.name)
        final = temp_of(entry.name)
        if _plain_file(entry) and (is_ours(entry.name) or (final is not None and is_ours(final))):
            contents.ours.append(path)
        else:
            contents.foreign.append(path)


def survey(out: str, settings: dict | None) -> Contents:
    """Every entry of OUT, sorted into ours / foreign by the record `settings` (nothing is followed
    through a symlink; a symlink is foreign)."""
    contents = Contents()
    if settings is None:  # no record: nothing in the folder is distill's (its lock aside)
        contents.foreign = [entry.name for entry in _entries(out) if entry.name != LOCK_NAME]
        return contents
    classes, ipc = recorded_images(settings)
    classes = set(classes)

    def image_of_record(name: str) -> bool:
        match = _IMAGE_FILE.fullmatch(name)
        return match is not None and int(match.group(1)) < ipc

    for entry in _entries(out):
        name = entry.name
        if name == LOCK_NAME and _plain_file(entry):
            continue
        if _plain_file(entry) and (name in NAMED_FILES or temp_of(name) in NAMED_FILES):
            contents.ours.append(name)
        elif _plain_dir(entry) and name in classes:
            _sort_folder(out, name, image_of_record, contents)
            contents.folders.append(name)
        elif _plain_dir(entry) and name == STAGE_DIR:
            for inner in _entries(entry.path):
                relative = os.path.join(name, inner.name)
                if _plain_dir(inner) and inner.name == FEATURES_DIR:
                    _sort_folder(out, relative, _FEATURE_FILE.fullmatch, contents)
                    contents.folders.append(relative)
                elif _plain_file(inner) and (inner.name in STAGE_FILES or temp_of(inner.name) in STAGE_FILES):
                    contents.ours.append(relative)
                else:
                    contents.foreign.append(relative)
            contents.folders.append(name)
        else:
            contents.foreign.append(name)
    contents.folders.sort(key=lambda path: -path.count(os.sep))
    return contents


def _differing_setting(saved: dict, current: dict) -> str | None:
    """The first setting (by name) whose value differs, described for a one-line error."""
    for key in current:
        if saved.get(key) != current[key]:
            def short(value):
                text = json.dumps(value, sort_keys=True)
                return text if len(text) <= 60 else text[:57] + "..."
            return f"{key} (folder: {short(saved.get(key))}, now: {short(current[key])})"
    for key in saved:
        if key not in current:
            return f"{key} (folder has it, this run does not)"
    return None


def foreign_refusal(out: str, contents: Contents) -> IGDSInputError:
    count = len(contents.foreign)
    return IGDSInputError(
        f"--force removes only what distill wrote, and {out} also holds {contents.foreign[0]}"
        + (f" (and {count - 1} more entr{'y' if count == 2 else 'ies'} distill did not write)" if count > 1 else "")
        + "; move it away or choose another --out")


def output_check(out: str, settings: dict, force: bool) -> Contents | None:
    """Whether OUT can take a run with these settings; reads only, so every rank may call it.

    None: nothing to clear (no folder, an empty one, or one with these settings: a resume). Contents:
    --force must clear these files first (the folder's settings differ and it holds nothing foreign).
    Refused, one line: other settings without --force; --force where OUT holds a file distill did not
    write (named); a non-empty folder without a settings file (with or without --force).
    """
    if not os.path.isdir(out):
        return None
    saved = read_settings(out)
    if saved is None:
        visible = sorted(name for name in os.listdir(out) if not name.startswith("."))
        if visible:
            raise IGDSInputError(f"{out} is not empty and was not written by distill (no {CONFIG_NAME}; it holds "
                                 f"{visible[0]}); choose another --out (--force removes only what distill wrote)")
        return None
    difference = _differing_setting(saved, settings)
    if difference is None:
        return None
    if not force:
        raise IGDSInputError(f"{out} holds images of another configuration: {difference}; "
                             "use --force to clear it or choose another --out")
    contents = survey(out, saved)
    if contents.foreign:
        raise foreign_refusal(out, contents)
    return contents


def clear(out: str, contents: Contents) -> None:
    """Remove what `contents` lists as distill's: its files, then its folders once empty, and the
    settings file last (a clearing that stops midway leaves a folder that still knows what is its own)."""
    for relative in contents.ours:
        if relative != CONFIG_NAME:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, relative))
    for folder in contents.folders:
        with contextlib.suppress(OSError):  # gone already, or (never, under the lock) not empty: kept
            os.rmdir(os.path.join(out, folder))
    if CONFIG_NAME in contents.ours:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out, CONFIG_NAME))


def png_defect(path: str) -> str | None:
    """Why the file at `path` is not a whole PNG (None: it is): every chunk's CRC, IEND last, and it decodes."""
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not data.startswith(PNG_SIGNATURE):
        return "not a PNG"
    position, ended = len(PNG_SIGNATURE), False
    while position + 12 <= len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        end = position + 12 + length
        if end > len(data):
            break
        kind = data[position + 4:position + 8]
        if zlib.crc32(data[position + 4:end - 4]) != int.from_bytes(data[end - 4:end], "big"):
            return f"damaged ({kind.decode('latin-1')} chunk checksum)"
        position = end
        if kind == b"IEND":
            ended = True
            break
    if not ended:
        return "truncated"
    if position != len(data):
        return "bytes after its end"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception:  # noqa: BLE001 - any decoder failure means the same: not a usable image
        return "does not decode"
    return None


def remove_defective_images(out: str, settings: dict, log) -> int:
    """Check every existing image the record names; remove the ones that are not whole PNGs (they are
    made again). Returns how many were removed."""
    existing = [path for path in image_paths(settings) if os.path.isfile(os.path.join(out, path))]
    if not existing:
        return 0
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL and zlib release the GIL
        defects = list(pool.map(lambda path: png_defect(os.path.join(out, path)), existing))
    bad = [(path, defect) for path, defect in zip(existing, defects) if defect is not None]
    for path, _ in bad:
        os.unlink(os.path.join(out, path))
    if bad:
        log(f"distill: {len(bad)} existing image(s) of {out} are not whole PNGs (e.g. {bad[0][0]}: {bad[0][1]}); "
            "they are made again")
    return len(bad)


__all__ = ["BATCH_NAME", "CONFIG_NAME", "Contents", "FEATURES_DIR", "MANIFEST_NAME", "NAMED_FILES", "PREVIEW_NAME",
           "STAGE_DIR", "STAGE_FILES", "clear", "foreign_refusal", "image_paths", "output_check", "png_defect",
           "read_settings", "remove_defective_images", "survey", "temp_of"]
