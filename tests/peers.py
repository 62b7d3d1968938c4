"""The peers' own code, as test-only references: DiT, MinimaxDiffusion, IGD's loop, RDED and SRe2L, never committed.

`bash tests/fetch_peers.sh` (needs network to GitHub) exports each repository at its pinned commit into
tests/.peers/<name>/ (git-ignored; IGDS_PEERS=DIR points elsewhere). A test that needs a peer calls
`load_peer(name, *modules)`: the peer's modules, imported from its folder under their own names
(`diffusion`, `models`, ...) and then set aside, so peers whose packages share names (DiT's and
IGD's `diffusion`) never see each other; it skips the test, saying why, when the code or a package it
imports (timm for the DiT models) is absent. The peers run unmodified: what a test injects is named in it.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import pytest

PEERS_ENV = "IGDS_PEERS"
# name -> (repository, pinned commit): the code the front-end claims are checked against.
PINS = {
    "dit": ("facebookresearch/DiT", "ed81ce2229091fd4ecc9a223645f95cf379d582b"),
    "minimax": ("vimar-gu/MinimaxDiffusion", "969fc6f0a5e392d22fc2da39d8a130a4c55c6033"),
    "igd": ("Lokshaw-Chau/MinimaxDiffusion", "359d7093dbc698cdc5461a893b6e9fc7b8808567"),  # IGD's loop (master)
    "rded": ("LINs-lab/RDED", "3f6453d8b18b6a9bcc6c718bc16ecda6bb94d59f"),  # its validation protocol (eval --protocol rded)
    "sre2l": ("VILA-Lab/SRe2L", "8d00cba364bfa34aa1f5a8107dc041ae1be8ebe6"),  # FKD relabel + train_FKD (--protocol sre2l)
}
_LOADED: dict[tuple[str, tuple[str, ...]], dict[str, ModuleType]] = {}


def peers_dir() -> str:
    return os.environ.get(PEERS_ENV) or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".peers")


def peer_root(name: str) -> str:
    """The folder of a peer's code at its pinned commit, or a skip naming how to get it."""
    repository, commit = PINS[name]
    root = os.path.join(peers_dir(), name)
    stamp = os.path.join(root, "PEER_COMMIT")
    if not os.path.isfile(stamp):
        pytest.skip(f"{repository} is not in {peers_dir()} (bash tests/fetch_peers.sh)")
    with open(stamp, encoding="utf-8") as handle:
        recorded = handle.read().split()
    if commit not in recorded:
        pytest.skip(f"{root} holds another commit of {repository} than the pinned {commit[:10]}")
    return root


def load_peer(name: str, *modules: str, stubs: dict[str, ModuleType] | None = None) -> dict[str, ModuleType]:
    """{module: the peer's module} imported from its folder (see the module docstring). stubs: modules
    the peer imports that are not installed here and that the test stands in for (named in the test,
    e.g. IGD's experiment logger `wandb`), present while the peer's modules load."""
    key = (name, modules)
    if key in _LOADED:
        return _LOADED[key]
    root = peer_root(name)
    stubs = dict(stubs or {})
    tops = {module.split(".")[0] for module in modules} | set(stubs)
    saved = {key: value for key, value in sys.modules.items() if key.split(".")[0] in tops}
    for key_ in saved:
        del sys.modules[key_]
    sys.path.insert(0, root)
    sys.modules.update(stubs)
    try:
        loaded = {module: importlib.import_module(module) for module in modules}
    except ImportError as exc:
        pytest.skip(f"{PINS[name][0]}'s code needs {exc.name or exc}: not installed here")
    finally:
        sys.path.remove(root)
        for key_ in [key_ for key_ in sys.modules if key_.split(".")[0] in tops]:
            del sys.modules[key_]
        sys.modules.update(saved)
    _LOADED[key] = loaded
    return loaded
