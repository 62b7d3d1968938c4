"""What igds_fast refuses before any work starts: sane caps, their override, bounded JSON, safe class names.

Caps. A file's header or a command's settings can imply work no machine can do (an IPC of 10^9, a
prior header declaring 100,000-pixel images, 10^9 diffusion steps). Those are refused in one line,
with the number, before anything is allocated:

* header fields (a prior's flags and diffusion, a VE's resolution and classes, a DiT's shapes, a
  diffusers config) are checked against HEADER_CAPS, the largest value that still describes a real
  model; beyond them a file is malformed, not large (no override);
* a run's work (images per class, samples, the bytes of its model and largest buffer) is checked
  against WORK_CAPS and the device's memory (distill/work.py); `--allow-large` (distill) or
  ALLOW_LARGE_ENV=1 (any command) lifts those caps for a run that really is that large.

JSON inputs (beta tables, manifests, --compile-options, configs, headers) are read with
`read_json` / `loads_json`: at most JSON_MAX_BYTES (a caller may pass another size) and
JSON_MAX_DEPTH levels of nesting, with one-line errors.

Class names become folder names (OUT/<class>/) and appear in messages and tables, so
`check_class_name` keeps them to what a listing shows faithfully: at most MAX_CLASS_NAME_BYTES bytes
of UTF-8, no control, format (bidirectional overrides, zero-width), separator or unassigned
characters, no path separators, not hidden ('.'), no leading or trailing white space.
"""
from __future__ import annotations

import json
import math
import os
import re
import unicodedata
from typing import Any

from .errors import IGDSInputError

ALLOW_LARGE_ENV = "IGDS_ALLOW_LARGE"

# Largest values a real model's header holds (beyond them the file is malformed; no override).
HEADER_CAPS = {
    "image side": 8192,  # pixels: a prior's image_size, a VE's resolution, a diffusers sample_size
    "image channels": 64,  # a prior's in_channels (3 for pixels, 4 for SD latents), a VE's in_channels
    "diffusion steps": 100_000,  # guided-diffusion trains with 1000 or 4000
    "classes": 100_000,  # ImageNet-21K has 21,841
    "model channels": 65_536,  # an ADM's num_channels (256 for ImageNet 256x256)
    "blocks per level": 64,  # an ADM's num_res_blocks (2 or 3)
    "levels": 16,  # the entries of an ADM's channel_mult (6 at 512x512)
}

# Sane caps of a distill run's work (ALLOW_LARGE_ENV=1 or --allow-large lifts them).
WORK_CAPS = {
    "images per class": 99_999,  # OUT/<class>/<index:05d>.png: five digits sort in index order
    "samples": 10_000_000,  # classes x images per class x composite (ImageNet-1K, IPC 100, 2x2, G 5: 2M)
}

MAX_CLASS_NAME_BYTES = 128
JSON_MAX_BYTES = 64 << 20
JSON_MAX_DEPTH = 64

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")


def large_allowed(flag: bool = False) -> bool:
    """Whether the work caps are lifted: the command's --allow-large, or ALLOW_LARGE_ENV=1."""
    return bool(flag) or os.environ.get(ALLOW_LARGE_ENV, "").strip() in ("1", "true", "yes")


def override_hint(flag: str | None = "--allow-large") -> str:
    """How a work cap is lifted (for the end of a refusal)."""
    where = f"{flag} or " if flag else ""
    return f"pass {where}{ALLOW_LARGE_ENV}=1 if it really is that large"


def format_bytes(count: int | float) -> str:
    """1536 -> '1.5 KiB'; for messages."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} PiB"


def header_int(value: Any, field: str, cap_name: str, source: str, minimum: int = 1) -> int:
    """A header's integer field, checked against HEADER_CAPS[cap_name]; one-line errors naming `source`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
        raise IGDSInputError(f"{source}: {field} must be an integer, got {value!r}")
    value = int(value)
    cap = HEADER_CAPS[cap_name]
    if value < minimum or value > cap:
        raise IGDSInputError(f"{source}: {field} {value} is outside [{minimum}, {cap}] (the {cap_name} of a real "
                             "model): the file is malformed")
    return value


def check_work_cap(name: str, value: int, detail: str, allow_large: bool, flag: str | None = "--allow-large") -> None:
    """Refuse `value` above WORK_CAPS[name] unless the caps are lifted; `detail` says how it was counted."""
    cap = WORK_CAPS[name]
    if value > cap and not large_allowed(allow_large):
        raise IGDSInputError(f"{detail} = {value:,} {name}, above the cap of {cap:,}; {override_hint(flag)}")


# ---- JSON ---------------------------------------------------------------------------------------


def json_depth(text: str) -> int:
    """The deepest nesting of arrays / objects in valid JSON text (strings are skipped)."""
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    depth = deepest = 0
    for char in brackets:  # only brackets are left: short for any real document
        depth += 1 if char in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads_json(text: str | bytes, source: str, max_bytes: int = JSON_MAX_BYTES, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """Parse JSON with a size and a depth limit; one-line IGDSInputError naming `source` for any defect."""
    size = len(text)
    if size > max_bytes:
        raise IGDSInputError(f"{source}: {format_bytes(size)} of JSON, more than the {format_bytes(max_bytes)} "
                             "this input may hold")
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IGDSInputError(f"{source} is not UTF-8 text (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IGDSInputError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise IGDSInputError(f"{source}: JSON nested more than {max_depth} levels deep") from None
    if isinstance(value, (dict, list)) and json_depth(text) > max_depth:
        raise IGDSInputError(f"{source}: JSON nested more than {max_depth} levels deep")
    return value


def read_json(path: str | os.PathLike, what: str, max_bytes: int = JSON_MAX_BYTES,
              max_depth: int = JSON_MAX_DEPTH) -> Any:
    """The JSON document at `path` (`what` names it in messages: "beta table", "manifest"), size and
    depth limited; a missing, unreadable, oversized, non-UTF-8 or invalid file is one line."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise IGDSInputError(f"{what} not found: {path}")
    if os.path.isdir(path):
        raise IGDSInputError(f"{what} {path} is a folder, not a JSON file")
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > max_bytes:
                raise IGDSInputError(f"{what} {path}: {format_bytes(size)}, more than the {format_bytes(max_bytes)} "
                                     "this input may hold")
            data = handle.read(size + 1)  # (read(n) allocates n bytes up front)
    except OSError as exc:
        raise IGDSInputError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return loads_json(data, f"{what} {path}", max_bytes, max_depth)


# ---- class names ----------------------------------------------------------------------------------


def class_name_problem(name: Any) -> str | None:
    """Why `name` cannot be a class (a folder name shown as it is), or None."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8 (a file name in another encoding?)"
    if size > MAX_CLASS_NAME_BYTES:
        return f"{size} bytes long (at most {MAX_CLASS_NAME_BYTES})"
    if name in (".", "..") or name.startswith("."):
        return "hidden or relative ('.' first)"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "contains a path separator"
    for char in name:
        category = unicodedata.category(char)
        if category[0] == "C" or category in ("Zl", "Zp"):
            kind = {"Cc": "control", "Cf": "invisible formatting (e.g. a bidirectional override)",
                    "Cs": "surrogate", "Co": "private-use", "Cn": "unassigned"}.get(category, "line separator")
            return f"contains the {kind} character U+{ord(char):04X}"
    if name != name.strip():
        return "starts or ends with white space"
    return None


def check_class_name(name: Any, what: str = "class") -> str:
    """`name` when it is a safe class name (module docstring), else a one-line IGDSInputError."""
    problem = class_name_problem(name)
    if problem is not None:
        shown = ascii(name) if isinstance(name, str) else repr(name)
        if len(shown) > 80:
            shown = shown[:60] + "..." + shown[-10:]
        raise IGDSInputError(f"{what} {shown} cannot be used: {problem}")
    return name


# ---- device memory -----------------------------------------------------------------------------------


def device_memory_bytes(device) -> int | None:
    """The memory a run on `device` can use at most: a CUDA device's total, the machine's RAM on a CPU
    (None where it is not known)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device.index or 0).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        except (AttributeError, OSError, ValueError):
            return None
    return None


def check_fits(nbytes: int, device, what: str, flag: str | None = None) -> None:
    """Refuse, in one line with the numbers, `what` (a buffer a command will hold, `nbytes` of it) when it
    exceeds the memory of `device` (device_memory_bytes), unless the caps are lifted (ALLOW_LARGE_ENV)."""
    available = device_memory_bytes(device)
    if available is not None and nbytes > available and not large_allowed():
        raise IGDSInputError(f"{what} needs {format_bytes(nbytes)} but {device} has {format_bytes(available)}; "
                             f"{override_hint(flag)}")


def free_disk_bytes(path: str) -> int | None:
    """Free bytes for this user on the file system holding `path` (or its nearest existing parent)."""
    import shutil

    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        return int(shutil.disk_usage(existing).free)
    except OSError:
        return None


def check_disk(nbytes: int, path: str, what: str, flag: str | None = None) -> None:
    """Refuse, in one line with the numbers, `what` (`nbytes` a command will write under `path`) when the
    file system holding `path` has less free space, unless the caps are lifted (ALLOW_LARGE_ENV)."""
    available = free_disk_bytes(path)
    if available is not None and nbytes > available and not large_allowed():
        raise IGDSInputError(f"{what} needs {format_bytes(nbytes)} of disk but {path} has {format_bytes(available)} "
                             f"free; {override_hint(flag)}")


__all__ = ["ALLOW_LARGE_ENV", "HEADER_CAPS", "JSON_MAX_BYTES", "JSON_MAX_DEPTH", "MAX_CLASS_NAME_BYTES", "WORK_CAPS",
           "check_class_name", "check_disk", "check_fits", "check_work_cap", "class_name_problem", "device_memory_bytes", "format_bytes", "free_disk_bytes",
           "header_int", "json_depth", "large_allowed", "loads_json", "override_hint", "read_json"]
