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


# ---- Tiny ImageNet and CIFAR-10 (the paper's Tables 3 and 5) ---------------------------------------


def _data_file(name):
    from importlib import resources

    return resources.files("igds_fast").joinpath("data", name)


def test_tinyimagenet_is_wnids_txt_200_imagenet_ids_in_file_order():
    tiny = class_list("tinyimagenet")
    assert len(tiny) == 200 and len(set(tiny)) == 200
    assert set(tiny) <= set(imagenet_wnids())
    assert tiny != sorted(tiny)  # wnids.txt's own order, which gives the distilled labels: never re-sorted
    # Anchors of tiny-imagenet-200/wnids.txt: its first, second, 23rd and last lines.
    assert tiny[:2] == ["n02124075", "n04067472"] and tiny[22] == "n01443537" and tiny[-1] == "n02504458"
    assert [wnid_name(w) for w in (tiny[0], tiny[1], tiny[-1])] == ["Egyptian cat", "reel", "African elephant"]
    for spelling in ("TinyImageNet", "tiny-imagenet", "tiny_imagenet"):
        assert class_list(spelling) == tiny


def test_tinyimagenet_labels_are_the_imagenet_indices_an_adm64_prior_is_conditioned_on():
    classes, labels = resolve_classes("tinyimagenet", imagenet_wnids())
    assert classes == class_list("tinyimagenet")
    assert labels == [imagenet_wnids().index(w) for w in classes]
    # Well-known ImageNet-1K labels: Egyptian cat 285, reel 758, goldfish 1, African elephant 386.
    assert (labels[0], labels[1], labels[22], labels[-1]) == (285, 758, 1, 386)


def test_cifar10_names_in_label_order_select_classes_of_the_ve():
    cifar = class_list("CIFAR-10")
    assert cifar == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    ve_names = list(reversed(cifar))  # an unconditional prior: the VE's class list is the universe
    classes, labels = resolve_classes("cifar10", ve_names)
    assert classes == cifar and labels == [9 - i for i in range(10)]
    with pytest.raises(IGDSInputError, match="'airplane' from class list 'cifar10' is not in the prior's class list"):
        resolve_classes("cifar10", imagenet_wnids())


def test_every_shipped_list_has_its_provenance_recorded():
    import hashlib
    import json
    from importlib import resources

    sources = json.loads(_data_file("sources.json").read_text(encoding="utf-8"))
    recorded = set(sources["files"]) | set(sources["other_files"])
    shipped = {entry.name for entry in resources.files("igds_fast").joinpath("data").iterdir()
               if entry.name.endswith(".txt")}
    assert shipped == recorded
    for entry in sources["other_files"].values():
        assert entry["repository"].startswith("https://github.com/") and len(entry["commit"]) == 40
    tiny = sources["other_files"]["tinyimagenet.txt"]
    assert hashlib.sha256(_data_file("tinyimagenet.txt").read_bytes()).hexdigest() == tiny["sha256"]


def test_distill_cli_accepts_classes_tinyimagenet_with_the_adm64_preset(tmp_path, monkeypatch):
    """`igds-fast distill --prior 64x64_diffusion.pt --preset adm64-cond --classes tinyimagenet`: the plan's labels."""
    import argparse

    from factories import tiny_ve
    from igds_fast.cli import distill as distill_cli
    from igds_fast.distill.plan import plan_distill

    tiny = class_list("tinyimagenet")
    ve = tiny_ve(num_classes=200)
    ve.class_names = list(tiny)
    ve.save(tmp_path / "ve_tiny.safetensors")
    (tmp_path / "64x64_diffusion.pt").write_bytes(b"not loaded: the plan reads the preset and fingerprints the file")
    plans = []
    monkeypatch.setattr(distill_cli, "distill", lambda config: plans.append(plan_distill(config)) or {})
    parser = argparse.ArgumentParser()
    distill_cli.add_parser(parser.add_subparsers(dest="command"))
    argv = ["distill", "--prior", str(tmp_path / "64x64_diffusion.pt"), "--preset", "adm64-cond",
            "--ve", str(tmp_path / "ve_tiny.safetensors"), "--classes", "tinyimagenet", "--ipc", "1",
            "--out", str(tmp_path / "out"), "--device", "cpu", "--quiet"]
    assert distill_cli.run(parser.parse_args(argv)) == 0
    (plan,) = plans
    assert plan.class_keys == tiny and plan.ve_labels == list(range(200))
    assert plan.prior_labels == [imagenet_wnids().index(w) for w in tiny]
    assert plan.pixel_settings["diffusion"]["noise_schedule"] == "cosine"  # ADM-64's
    assert len(plan.jobs) == 200
