"""Our artifacts' identity: the JSON header of our safetensors files (VE bundles, trained priors), one
validator, and the fingerprints that tell a rerun whether a model file is the one a folder was made with."""
from __future__ import annotations

import hashlib
import json
import os

from safetensors import safe_open

from .errors import IGDSInputError

FULL_HASH_LIMIT = 256 << 20  # files up to this size are hashed whole; larger ones by head + tail
PARTIAL_HASH_CHUNK = 16 << 20


def read_safetensors(path: str, what: str, with_tensors: bool = False) -> tuple[dict, dict | None]:
    """(metadata, {name: tensor} or None) of a safetensors file, read on the CPU; one-line errors.

    what: how the file is named when it is missing ("VE bundle", "prior file").
    """
    if not os.path.isfile(path):
        raise IGDSInputError(f"{what} not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()} if with_tensors else None
    except Exception as exc:  # safetensors raises its own error type for every format defect
        reason = " ".join(str(exc).split())[:200]
        raise IGDSInputError(f"{path} is not a readable safetensors file: {reason}") from exc
    return metadata, tensors


def parse_json_header(metadata: dict, path: str, key: str, format_name: str, format_version: int, what: str) -> dict:
    """The JSON object stored under `key` in a safetensors file's metadata, with its format checked.

    what: how the artifact is named in the one-line errors ("VE bundle", "prior").
    """
    if key not in metadata:
        raise IGDSInputError(f"{path} is not an igds {what} (no '{key}' metadata)")
    try:
        header = json.loads(metadata[key])
    except json.JSONDecodeError as exc:
        raise IGDSInputError(f"{path}: the '{key}' header is not valid JSON ({exc.msg})") from exc
    if not isinstance(header, dict) or header.get("format") != format_name:
        raise IGDSInputError(f"{path} is not an igds {what} (header format is not '{format_name}')")
    if header.get("format_version") != format_version:
        raise IGDSInputError(
            f"{path}: unsupported {what} format_version {header.get('format_version')!r} (this reader: {format_version})"
        )
    return header


def file_fingerprint(path: str) -> dict:
    """{"size", "sha256"} of a file; files over FULL_HASH_LIMIT hash their size, first and last 16 MiB.

    Identity, not security: it tells a rerun whether the model it loads is the one the folder was
    made with, without reading a multi-GB checkpoint in full every time.
    """
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            kind = "sha256"
        else:
            digest.update(str(size).encode())
            digest.update(handle.read(PARTIAL_HASH_CHUNK))
            handle.seek(size - PARTIAL_HASH_CHUNK)
            digest.update(handle.read(PARTIAL_HASH_CHUNK))
            kind = "sha256-head-tail"
    return {"size": size, kind: digest.hexdigest()}


def folder_fingerprint(directory: str) -> dict:
    """Fingerprints of the files of a diffusers model folder (config + weights), by relative name."""
    entries = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not name.startswith("."):
            entries[name] = file_fingerprint(path)
    return entries
