"""Class lists: ImageNet-1K WordNet ids, ImageNet subsets, CIFAR-10's names, and class selection specs.

The lists live as text files in ``igds_fast/data/`` (provenance in ``igds_fast/data/sources.json``):

* ``imagenet1k_wnids.txt`` -- the 1000 ImageNet-1K WordNet ids, sorted; the ImageNet label of a
  class is its index in this list (the convention of ADM / guided-diffusion and DiT checkpoints).
* ``imagenet1k_names.txt`` -- the human-readable names, aligned line by line with the ids.
* ``imagewoof.txt``, ``imagenette.txt``, ``imagenet100.txt`` -- subsets in MinimaxDiffusion's
  order. IGDS_SPEC section 7: the label of a class *in a distilled dataset* is its index in the
  subset list, so the order is part of the protocol and must not be re-sorted.
* ``tinyimagenet.txt`` -- Tiny ImageNet's 200 WordNet ids in the order of its ``wnids.txt`` (every
  one an ImageNet-1K class, so an ImageNet prior such as ADM-64 is conditioned on its index there).
* ``cifar10.txt`` -- CIFAR-10's 10 class names in its label order (not ImageNet classes: a CIFAR-10
  prior is unconditional, and the names select classes of the VE).

Two label spaces meet here. A *prior* (a class-conditional diffusion model or classifier) knows a
list of classes, ``prior_classes``, and is conditioned on indices into it. A *selection* picks some
of those classes, in a chosen order; the distilled dataset labels class ``selection.classes[i]`` as
``i``, while ``selection.prior_labels[i]`` is what the prior must be conditioned on.
"""
from __future__ import annotations

import functools
import os
import re
from importlib import resources
from typing import NamedTuple, Sequence

from igds_fast.errors import IGDSInputError

# ImageNet-1K subsets (WordNet ids), in the order that gives their distilled labels.
_SUBSET_FILES = {
    "imagewoof": "imagewoof.txt",
    "imagenette": "imagenette.txt",
    "imagenet100": "imagenet100.txt",
    "tinyimagenet": "tinyimagenet.txt",
}
# Lists of other datasets' class names, in their label order.
_OTHER_LIST_FILES = {
    "cifar10": "cifar10.txt",
}
IMAGENET1K = "imagenet1k"
KNOWN_LISTS = (IMAGENET1K, *_SUBSET_FILES, *_OTHER_LIST_FILES)

_WNID_PATTERN = re.compile(r"^n\d{8}$")
_INDEX_PATTERN = re.compile(r"^\d+$")
_RANGE_PATTERN = re.compile(r"^(\d+)\s*-\s*(\d+)$")


class ClassSelection(NamedTuple):
    """Selected classes in distilled-label order, and each one's label in the prior's class list.

    Unpacks like a tuple: ``classes, prior_labels = resolve_classes(...)``.
    """

    classes: list[str]
    prior_labels: list[int]


def _read_package_list(filename: str) -> list[str]:
    """Non-empty, stripped lines of a text file shipped in ``igds_fast/data``."""
    text = resources.files("igds_fast").joinpath("data", filename).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


@functools.lru_cache(maxsize=None)
def _cached_list(filename: str) -> tuple[str, ...]:
    # Cached as a tuple so no caller can mutate the shared copy; callers get fresh lists.
    return tuple(_read_package_list(filename))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1K WordNet ids, sorted (n01440764 ... n15075141); label = list index."""
    return list(_cached_list("imagenet1k_wnids.txt"))


def imagenet_class_names() -> list[str]:
    """Human-readable ImageNet-1K names aligned with :func:`imagenet_wnids` (e.g. "tench, Tinca tinca")."""
    return list(_cached_list("imagenet1k_names.txt"))


@functools.lru_cache(maxsize=None)
def _wnid_to_name() -> dict[str, str]:
    return dict(zip(_cached_list("imagenet1k_wnids.txt"), _cached_list("imagenet1k_names.txt")))


def wnid_name(wnid: str, short: bool = True) -> str:
    """The name of an ImageNet WordNet id: its first synonym ("tench") or, with short=False, all of them.

    Unknown ids raise IGDSInputError.
    """
    names = _wnid_to_name()
    if wnid not in names:
        raise IGDSInputError(f"unknown ImageNet WordNet id {wnid!r}")
    full = names[wnid]
    return full.split(",")[0].strip() if short else full


def class_list(name: str) -> list[str]:
    """A named class list: "imagenet1k" (1000 sorted wnids), an ImageNet subset, or CIFAR-10's names.

    Subsets (wnids): "imagewoof", "imagenette", "imagenet100" (MinimaxDiffusion's order) and
    "tinyimagenet" (the 200 ids of Tiny ImageNet's wnids.txt, in its order). "cifar10": airplane ...
    truck in CIFAR-10's label order. Case-insensitive; "-" / "_" are ignored ("ImageNet-1K",
    "tiny-imagenet", "CIFAR-10" work). Unknown names raise IGDSInputError listing the known ones.
    """
    key = _normalise_list_name(name)
    if key == IMAGENET1K:
        return imagenet_wnids()
    if key in _SUBSET_FILES:
        return list(_cached_list(_SUBSET_FILES[key]))
    if key in _OTHER_LIST_FILES:
        return list(_cached_list(_OTHER_LIST_FILES[key]))
    raise IGDSInputError(
        f"unknown class list {name!r}; known lists: {', '.join(KNOWN_LISTS)}"
    )


def _normalise_list_name(name: str) -> str:
    return str(name).strip().lower().replace("-", "").replace("_", "")


def read_class_file(path: str | os.PathLike) -> list[str]:
    """Class ids from a text file, one per line (first whitespace-separated token of each line).

    Blank lines and lines starting with '#' are ignored, so MinimaxDiffusion's ``class_*.txt`` files
    and annotated lists ("n01440764 tench") both work. Empty files and duplicates raise
    IGDSInputError naming the file (and the duplicate).
    """
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise IGDSInputError(f"cannot read class list file {os.fspath(path)!r}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        raise IGDSInputError(f"class list file {os.fspath(path)!r} is not UTF-8 text")
    classes = []
    seen = set()
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        token = stripped.split()[0]
        if token in seen:
            raise IGDSInputError(f"class list file {os.fspath(path)!r} lists {token!r} twice")
        seen.add(token)
        classes.append(token)
    if not classes:
        raise IGDSInputError(f"class list file {os.fspath(path)!r} contains no classes")
    return classes


def _parse_index_items(spec: str, num_prior_classes: int) -> list[int] | None:
    """Indices from "0-9,17"-style specs; None when the spec is not made only of indices / ranges."""
    items = [item.strip() for item in spec.split(",")]
    if not all(_INDEX_PATTERN.match(item) or _RANGE_PATTERN.match(item) for item in items):
        return None
    indices: list[int] = []
    for item in items:
        range_match = _RANGE_PATTERN.match(item)
        if range_match:
            first, last = int(range_match.group(1)), int(range_match.group(2))
            if first > last:
                raise IGDSInputError(f"class range {item!r} is empty (start > end)")
            span = range(first, last + 1)
        else:
            span = range(int(item), int(item) + 1)
        for index in span:
            if index >= num_prior_classes:
                raise IGDSInputError(
                    f"class index {index} (from {item!r}) is out of range: the prior has "
                    f"{num_prior_classes} classes (0-{num_prior_classes - 1})"
                )
            indices.append(index)
    return indices


def _check_unique(classes: Sequence[str]) -> None:
    seen = set()
    for name in classes:
        if name in seen:
            raise IGDSInputError(f"class {name!r} is selected twice")
        seen.add(name)


def resolve_classes(spec: str, prior_classes: Sequence[str] | None = None) -> ClassSelection:
    """Turn a class spec into (classes in distilled-label order, their labels in the prior).

    ``spec`` is one of
      * a list name: "imagewoof", "imagenette", "imagenet100", "tinyimagenet", "imagenet1k", "cifar10"
        (see :func:`class_list`);
      * a path to a text file of class ids, one per line (see :func:`read_class_file`);
      * comma-separated items, each an index ("17"), an inclusive index range ("0-9") or a class id
        of the prior ("n01440764"); e.g. "0-9,17". A purely numeric item is always an index.

    ``prior_classes`` is the prior's class list (label = index in it); None means the ImageNet-1K
    list. Every selected class must be in it: a wnid it lacks, an out-of-range index, an unknown
    name or a class selected twice raise a one-line IGDSInputError naming the offending item.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise IGDSInputError("empty class spec; give a list name, a class file or indices like 0-9")
    spec = spec.strip()
    prior = list(prior_classes) if prior_classes is not None else imagenet_wnids()
    if not prior:
        raise IGDSInputError("the prior's class list is empty")
    prior_index = {name: index for index, name in enumerate(prior)}
    if len(prior_index) != len(prior):
        raise IGDSInputError("the prior's class list contains duplicate classes")

    if _normalise_list_name(spec) in KNOWN_LISTS:
        classes = class_list(spec)
        source = f"class list {spec!r}"
    elif os.path.isfile(spec):
        classes = read_class_file(spec)
        source = f"class list file {spec!r}"
    else:
        indices = _parse_index_items(spec, len(prior))
        if indices is not None:
            classes = [prior[index] for index in indices]
            _check_unique(classes)
            return ClassSelection(classes, indices)
        items = [item.strip() for item in spec.split(",")]
        if len(items) == 1 and (os.sep in spec or spec.endswith(".txt")):
            raise IGDSInputError(f"class list file {spec!r} does not exist")
        classes = []
        for item in items:
            if not item:
                raise IGDSInputError(f"empty item in class spec {spec!r}")
            if _INDEX_PATTERN.match(item) or _RANGE_PATTERN.match(item):
                # Mixed with names: resolve this item as an index / range on its own.
                classes.extend(prior[i] for i in _parse_index_items(item, len(prior)))
            elif item in prior_index:
                classes.append(item)
            elif len(items) == 1 and not _WNID_PATTERN.match(item):
                raise IGDSInputError(
                    f"unknown class spec {item!r}: not a list name ({', '.join(KNOWN_LISTS)}), "
                    "an existing file, indices like 0-9,17 or a class of the prior"
                )
            else:
                raise IGDSInputError(f"class {item!r} is not in the prior's class list")
        source = f"class spec {spec!r}"

    _check_unique(classes)
    labels = []
    for name in classes:
        if name not in prior_index:
            raise IGDSInputError(f"class {name!r} from {source} is not in the prior's class list")
        labels.append(prior_index[name])
    return ClassSelection(classes, labels)
