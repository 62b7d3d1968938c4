"""Our artifacts' identity: the JSON header of our safetensors files (VE bundles, trained priors), one
validator, and the fingerprints that tell a rerun whether a model file is the one a folder was made with."""
from __future__ import annotations

import hashlib
import os
import zipfile
from typing import Mapping

import torch
from safetensors import safe_open

from .errors import IGDSInputError
from .limits import format_bytes, loads_json

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


def check_finite_weights(state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse, in one line naming `source` and the first bad tensor, weights holding NaN or ±Inf.

    A model with such a weight samples saturated or NaN images; only the guidance gradient used to be
    checked, so an Inf in a prior went through to the PNGs. Called by every loader (priors, VAE, VE,
    encoders) when the file is read, before anything is sampled.
    """
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.is_meta:
            continue
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            infinite = int(torch.isinf(value).sum())
            nan = int(torch.isnan(value).sum())
            raise IGDSInputError(f"{source}: weight {key} is non-finite ({infinite} infinite and {nan} NaN value(s) of "
                                 f"{value.numel()}): the file is corrupt (or its training diverged)")


def parse_json_header(metadata: dict, path: str, key: str, format_name: str, format_version: int, what: str) -> dict:
    """The JSON object stored under `key` in a safetensors file's metadata, with its format checked.

    what: how the artifact is named in the one-line errors ("VE bundle", "prior").
    """
    if key not in metadata:
        raise IGDSInputError(f"{path} is not an igds {what} (no '{key}' metadata)")
    header = loads_json(metadata[key], f"{path}: the '{key}' header")
    if not isinstance(header, dict) or header.get("format") != format_name:
        raise IGDSInputError(f"{path} is not an igds {what} (header format is not '{format_name}')")
    if header.get("format_version") != format_version:
        raise IGDSInputError(
            f"{path}: unsupported {what} format_version {header.get('format_version')!r} (this reader: {format_version})"
        )
    return header


def check_torch_archive(path: str, what: str = "checkpoint") -> None:
    """Refuse, before torch reads it, a zip checkpoint that would inflate to more than its own size.

    torch.save stores every member uncompressed, so a compressed member (a 1 MB file declaring a 1 GB
    tensor of zeros, which torch.load inflates in full before any check) is not a checkpoint. The
    legacy (non-zip) format is read by torch sequentially and left to it.
    """
    try:
        if not zipfile.is_zipfile(path):
            return
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, zipfile.BadZipFile) as exc:
        raise IGDSInputError(f"cannot read {what} {path}: {exc}") from None
    size = os.path.getsize(path)
    for info in sorted(members, key=lambda member: -member.file_size):  # the largest named first
        if info.compress_type != zipfile.ZIP_STORED:
            raise IGDSInputError(f"{what} {path}: its member {info.filename} is compressed and inflates to "
                                 f"{format_bytes(info.file_size)} from {format_bytes(info.compress_size)}; torch.save "
                                 "never compresses: refused before reading it")
    declared = sum(info.file_size for info in members)
    if declared > size:
        raise IGDSInputError(f"{what} {path} declares {format_bytes(declared)} of members in a file of "
                             f"{format_bytes(size)}: refused before reading it")


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
