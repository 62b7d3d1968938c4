"""The JSON header of our own safetensors artifacts (VE bundles, trained priors): one validator."""
from __future__ import annotations

import json

from .errors import IGDSInputError


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
