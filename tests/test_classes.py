"""Class lists shipped with the package and class-spec resolution."""
import pytest

from igds_fast.classes import (
    class_list,
    imagenet_class_names,
    imagenet_wnids,
    read_class_file,
    resolve_classes,
    wnid_name,
)
from igds_fast.errors import IGDSInputError


def test_imagenet_wnids_are_1000_sorted_unique_with_known_anchors():
    wnids = imagenet_wnids()
    assert len(wnids) == 1000
    assert len(set(wnids)) == 1000
    assert wnids == sorted(wnids)
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert wnids[0] == "n01440764"
    assert wnids[999] == "n15075141"
    # Callers get a copy: mutating it must not corrupt the shared list.
    wnids[0] = "mutated"
    assert imagenet_wnids()[0] == "n01440764"


def test_imagenet_names_align_with_wnids():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert names[0].startswith("tench")
    assert wnid_name("n01440764") == "tench"
    assert wnid_name("n15075141").startswith("toilet tissue")
    # ImageNette classes are well known: their names pin the alignment mid-list too.
    expected = ["tench", "English springer", "cassette player", "chain saw", "church",
                "French horn", "garbage truck", "gas pump", "golf ball", "parachute"]
    assert [wnid_name(w) for w in class_list("imagenette")] == expected


@pytest.mark.parametrize("name", ["imagewoof", "imagenette"])
def test_subset_lists_have_10_unique_imagenet_wnids(name):
    subset = class_list(name)
    assert len(subset) == 10
    assert len(set(subset)) == 10
    assert set(subset) <= set(imagenet_wnids())


def test_subset_order_is_minimax_order_not_sorted():
    woof = class_list("imagewoof")
    assert woof[0] == "n02096294"  # Australian terrier first in MinimaxDiffusion's class_woof.txt
    assert woof != sorted(woof)
    assert [wnid_name(w) for w in woof][:3] == ["Australian terrier", "Border terrier", "Samoyed"]


def test_class_list_name_normalisation_and_unknown():
    assert class_list("ImageNet-1K") == imagenet_wnids()
    assert class_list("ImageWoof") == class_list("imagewoof")
    with pytest.raises(IGDSInputError, match="imagefruit"):
        class_list("imagefruit")


def test_resolve_named_list_gives_prior_labels():
    classes, labels = resolve_classes("imagenette", None)
    wnids = imagenet_wnids()
    assert classes == class_list("imagenette")
    assert labels == [wnids.index(w) for w in classes]
    assert labels[0] == 0  # tench


def test_resolve_indices_and_ranges():
    prior = [f"c{i}" for i in range(30)]
    classes, labels = resolve_classes("0-3, 17,5", prior)
    assert labels == [0, 1, 2, 3, 17, 5]
    assert classes == ["c0", "c1", "c2", "c3", "c17", "c5"]


def test_resolve_indices_out_of_range_names_item():
    prior = [f"c{i}" for i in range(10)]
    with pytest.raises(IGDSInputError, match="12"):
        resolve_classes("0-12", prior)
    with pytest.raises(IGDSInputError, match="5-2"):
        resolve_classes("5-2", prior)
    with pytest.raises(IGDSInputError, match="twice"):
        resolve_classes("1,1", prior)


def test_resolve_file_of_wnids(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# my subset\nn02096294 Australian terrier\n\nn01440764\n")
    assert read_class_file(path) == ["n02096294", "n01440764"]
    classes, labels = resolve_classes(str(path), imagenet_wnids())
    assert classes == ["n02096294", "n01440764"]
    assert labels == [imagenet_wnids().index("n02096294"), 0]


def test_resolve_file_with_wnid_missing_from_prior(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("n01440764\nn02096294\n")
    small_prior = ["n01440764", "n01443537"]
    with pytest.raises(IGDSInputError, match="n02096294"):
        resolve_classes(str(path), small_prior)


def test_resolve_errors_name_the_item(tmp_path):
    with pytest.raises(IGDSInputError, match="imagefruit"):
        resolve_classes("imagefruit", None)
    with pytest.raises(IGDSInputError, match="n99999999"):
        resolve_classes("n01440764,n99999999", None)
    with pytest.raises(IGDSInputError, match="does not exist"):
        resolve_classes(str(tmp_path / "missing.txt"), None)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    with pytest.raises(IGDSInputError, match="no classes"):
        resolve_classes(str(empty), None)


def test_resolve_wnids_inline_and_custom_prior_names():
    classes, labels = resolve_classes("n15075141,n01440764", None)
    assert labels == [999, 0]
    digits_prior = [str(d) for d in range(10)]
    classes, labels = resolve_classes("7,2", digits_prior)
    assert classes == ["7", "2"] and labels == [7, 2]
