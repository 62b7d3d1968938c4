"""ResNet-18/50: torchvision-identical state dicts, Softplus option, MoCo checkpoint loading."""
import pytest
import torch
import torch.nn as nn

from igds_fast.errors import IGDSInputError
from igds_fast.models.resnet import GlobalAveragePool, build_resnet, load_moco_encoder, resnet18, resnet50


def _torchvision_reference_shapes(arch: str, num_classes: int = 1000) -> dict[str, tuple]:
    """torchvision's state-dict keys and shapes, written out from its published layout (not from our code)."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, channels):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    if arch == "resnet18":
        blocks, expansion = (2, 2, 2, 2), 1
    else:
        blocks, expansion = (3, 4, 6, 3), 4
    inplanes = 64
    for layer, (count, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), start=1):
        for index in range(count):
            p = f"layer{layer}.{index}"
            if expansion == 1:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
            else:
                shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
                bn(f"{p}.bn1", planes)
                shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                bn(f"{p}.bn2", planes)
                shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
                bn(f"{p}.bn3", planes * 4)
            if index == 0 and (layer > 1 or inplanes != planes * expansion):
                shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    shapes["fc.weight"] = (num_classes, 512 * expansion)
    shapes["fc.bias"] = (num_classes,)
    return shapes


@pytest.mark.parametrize("arch,params,entries", [("resnet18", 11_689_512, 122), ("resnet50", 25_557_032, 320)])
def test_parameter_count_and_state_dict_match_torchvision(arch, params, entries):
    with torch.device("meta"):  # no memory, no init cost: only names and shapes matter here
        model = build_resnet(arch)
    assert sum(p.numel() for p in model.parameters()) == params
    state = model.state_dict()
    assert len(state) == entries
    reference = _torchvision_reference_shapes(arch)
    assert list(state) == list(reference)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in state.items()} == reference


def test_known_torchvision_keys():
    with torch.device("meta"):
        r50, r18 = resnet50(), resnet18()
    s50, s18 = r50.state_dict(), r18.state_dict()
    assert tuple(s50["layer1.0.downsample.0.weight"].shape) == (256, 64, 1, 1)
    assert tuple(s50["layer4.2.bn3.running_var"].shape) == (2048,)
    assert s50["bn1.num_batches_tracked"].dtype == torch.long
    assert tuple(s50["fc.weight"].shape) == (1000, 2048)
    assert "layer1.0.downsample.0.weight" not in s18  # BasicBlock layer1 keeps 64 channels
    assert tuple(s18["layer2.0.downsample.1.running_mean"].shape) == (128,)
    # ResNet v1.5: the Bottleneck's stride is on the 3x3 conv, not the first 1x1.
    assert r50.layer2[0].conv1.stride == (1, 1) and r50.layer2[0].conv2.stride == (2, 2)
    assert r50.layer2[0].downsample[0].stride == (2, 2)


def test_softplus_replaces_every_relu_and_keeps_state_dict():
    with torch.device("meta"):
        smooth = resnet50(softplus_beta=3.0)
        plain = resnet50(softplus_beta=None)
    softplus = [m for m in smooth.modules() if isinstance(m, nn.Softplus)]
    assert softplus and all(m.beta == 3.0 for m in softplus)
    assert not any(isinstance(m, nn.ReLU) for m in smooth.modules())
    assert any(isinstance(m, nn.ReLU) for m in plain.modules())
    assert not any(isinstance(m, nn.Softplus) for m in plain.modules())
    assert {k: v.shape for k, v in smooth.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_softplus_changes_the_function_relu_does_not_match():
    smooth = resnet18(num_classes=None, softplus_beta=3.0).eval()
    plain = resnet18(num_classes=None, softplus_beta=None).eval()
    plain.load_state_dict(smooth.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(smooth.forward_features(x), plain.forward_features(x))


def test_forward_shapes_and_fc_on_features():
    model = resnet18(num_classes=7).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        z = model.forward_features(x)
        logits = model(x)
    assert model.feature_dim == 512 and z.shape == (3, 512)
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, model.fc(z))
    assert torch.isfinite(z).all()


def test_resnet50_forward_feature_dim():
    model = resnet50(num_classes=None).eval()
    with torch.no_grad():
        z = model(torch.randn(1, 3, 32, 32))
    assert model.feature_dim == 2048 and z.shape == (1, 2048)


def test_trunk_only_and_grayscale_options():
    model = resnet18(num_classes=None, in_channels=1).eval()
    assert not any(k.startswith("fc.") for k in model.state_dict())
    assert tuple(model.conv1.weight.shape) == (64, 1, 7, 7)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x))


def test_instance_norm_is_per_sample():
    model = resnet18(num_classes=None, norm="instance")
    assert "bn1.weight" in model.state_dict() and "bn1.running_mean" not in model.state_dict()
    # 64x64 leaves layer4 a 2x2 map: instance statistics over a single pixel are undefined.
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        together = model.forward_features(x)  # train mode: still no batch statistics
        alone = model.forward_features(x[1:2])
    torch.testing.assert_close(together[1:2], alone, rtol=1e-4, atol=1e-5)


def test_input_gradient_is_finite_and_nonzero():
    model = resnet18(num_classes=None).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    (model.forward_features(x) * torch.randn(2, 512)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"arch": "resnet34"}, "unknown ResNet arch"),
        ({"arch": "resnet18", "norm": "layer"}, "unknown norm"),
        ({"arch": "resnet18", "softplus_beta": -1.0}, "softplus_beta"),
        ({"arch": "resnet18", "num_classes": 0}, "num_classes"),
        ({"arch": "resnet18", "in_channels": 0}, "in_channels"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(IGDSInputError, match=match):
        with torch.device("meta"):
            build_resnet(**kwargs)


def test_wrong_input_channels_rejected():
    model = resnet18(num_classes=None)
    with pytest.raises(IGDSInputError, match=r"expects \[B, 3, H, W\]"):
        model.forward_features(torch.randn(1, 1, 32, 32))


# ---- MoCo checkpoints --------------------------------------------------------------------------


def _randomise_batchnorm(model):
    """Non-trivial running statistics, so a load that skipped buffers would be caught."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
            module.num_batches_tracked.fill_(int(torch.randint(1, 1000, ())))
    return model


def _moco_v2_checkpoint(model, feature_dim):
    """A MoCo v2 main_moco.py checkpoint: DDP-prefixed query/key encoders, MLP head, queue, optimizer."""
    state = {}
    trunk = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    head = {
        "fc.0.weight": torch.randn(feature_dim, feature_dim),
        "fc.0.bias": torch.randn(feature_dim),
        "fc.2.weight": torch.randn(128, feature_dim),
        "fc.2.bias": torch.randn(128),
    }
    for encoder in ("encoder_q", "encoder_k"):
        for key, value in {**trunk, **head}.items():
            # The key encoder is a different network: loading it by mistake must be detectable.
            state[f"module.{encoder}.{key}"] = value.clone() if encoder == "encoder_q" else torch.randn_like(value.float()).to(value.dtype)
    state["module.queue"] = torch.randn(128, 64)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    return {"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def _assert_same_trunk(loaded, source):
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_load_moco_v2_checkpoint(tmp_path):
    source = _randomise_batchnorm(resnet18(num_classes=None)).eval()
    path = tmp_path / "moco_v2.pth.tar"
    torch.save(_moco_v2_checkpoint(source, 512), path)
    loaded = load_moco_encoder(path, arch="resnet18")
    assert loaded.num_classes is None and not loaded.training and loaded.softplus_beta == 3.0
    _assert_same_trunk(loaded, source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), source.forward_features(x), rtol=0, atol=0)


def test_load_moco_v2_checkpoint_resnet50(tmp_path):
    source = _randomise_batchnorm(resnet50(num_classes=None))
    path = tmp_path / "moco_v2_r50.pth.tar"
    torch.save(_moco_v2_checkpoint(source, 2048), path)
    loaded = load_moco_encoder(path, softplus_beta=None)
    assert loaded.arch == "resnet50" and loaded.softplus_beta is None
    _assert_same_trunk(loaded, source)


@pytest.mark.parametrize("layout", ["plain", "encoder_q", "module", "moco_v1"])
def test_load_other_checkpoint_layouts(tmp_path, layout):
    source = _randomise_batchnorm(resnet18(num_classes=1000))
    state = source.state_dict()
    if layout == "plain":
        checkpoint = state  # torchvision style, with its fc (dropped)
    elif layout == "encoder_q":
        checkpoint = {"state_dict": {f"encoder_q.{k}": v for k, v in state.items()}}
    elif layout == "module":
        checkpoint = {"state_dict": {f"module.{k}": v for k, v in state.items()}}
    else:  # MoCo v1: a linear 128-d head
        trunk = {k: v for k, v in state.items() if not k.startswith("fc.")}
        trunk.update({"fc.weight": torch.randn(128, 512), "fc.bias": torch.randn(128)})
        checkpoint = {"state_dict": {f"module.encoder_q.{k}": v for k, v in trunk.items()}}
    path = tmp_path / "ckpt.pth"
    torch.save(checkpoint, path)
    _assert_same_trunk(load_moco_encoder(path, arch="resnet18"), source)


def _assert_one_line(excinfo):
    assert "\n" not in str(excinfo.value)


def test_moco_missing_and_unexpected_keys(tmp_path):
    state = resnet18(num_classes=None).state_dict()
    missing = dict(state)
    del missing["layer3.1.bn2.running_var"]
    torch.save({"state_dict": {f"module.encoder_q.{k}": v for k, v in missing.items()}}, tmp_path / "a.pth")
    with pytest.raises(IGDSInputError, match=r"missing keys: layer3\.1\.bn2\.running_var") as excinfo:
        load_moco_encoder(tmp_path / "a.pth", arch="resnet18")
    _assert_one_line(excinfo)

    extra = dict(state, **{"layer5.0.conv1.weight": torch.randn(3)})
    torch.save(extra, tmp_path / "b.pth")
    with pytest.raises(IGDSInputError, match=r"unexpected keys: layer5\.0\.conv1\.weight"):
        load_moco_encoder(tmp_path / "b.pth", arch="resnet18")


def test_moco_shape_mismatch_and_wrong_arch(tmp_path):
    state = resnet18(num_classes=None).state_dict()
    state["conv1.weight"] = torch.randn(64, 3, 5, 5)
    torch.save(state, tmp_path / "a.pth")
    with pytest.raises(IGDSInputError, match=r"shape mismatch.*conv1\.weight \(64, 3, 5, 5\) vs \(64, 3, 7, 7\)") as excinfo:
        load_moco_encoder(tmp_path / "a.pth", arch="resnet18")
    _assert_one_line(excinfo)
    with pytest.raises(IGDSInputError, match="does not fit a resnet50 trunk") as excinfo:
        load_moco_encoder(tmp_path / "a.pth", arch="resnet50")
    _assert_one_line(excinfo)


class _NotAllowed:  # a pickled class: weights_only=True must refuse it
    pass


def test_moco_unreadable_files(tmp_path):
    with pytest.raises(IGDSInputError, match="not found"):
        load_moco_encoder(tmp_path / "absent.pth")
    (tmp_path / "garbage.pth").write_bytes(bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).tolist()))
    with pytest.raises(IGDSInputError, match="cannot read checkpoint") as excinfo:
        load_moco_encoder(tmp_path / "garbage.pth")
    _assert_one_line(excinfo)
    torch.save({"state_dict": {"conv1.weight": _NotAllowed()}}, tmp_path / "code.pth")
    with pytest.raises(IGDSInputError, match="weights_only=True") as excinfo:
        load_moco_encoder(tmp_path / "code.pth")
    _assert_one_line(excinfo)


@pytest.mark.parametrize("shape", [(4, 2048, 7, 7), (3, 512, 4, 4), (2, 64, 3, 5)])
def test_global_average_pool_equals_adaptive_pool_bit_for_bit(shape):
    # a mean because CUDA's adaptive-pool backward is non-deterministic; same bits on CPU, so no
    # CPU result of the VE moved
    x = torch.randn(shape)
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=fmt)
        assert torch.equal(GlobalAveragePool()(x), torch.nn.AdaptiveAvgPool2d((1, 1))(x))
