"""The networks of the papers: sizes and MACs as published, pretrained loading, names."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pipeline.checkpoint import CheckpointError
from pipeline.models import (
    CifarResNet,
    CifarVGG,
    PadShortcut,
    build_model,
    check_arch,
    complexity,
    count_macs,
    count_params,
    count_tp_macs,
    format_complexity,
    load_pretrained,
    shrink_to,
    zero_init_last_bn,
)

CIFAR = (3, 32, 32)


def cifar(name: str, shortcut: str = "A", classes: int = 10) -> nn.Module:
    return build_model({"name": name, "num_classes": classes, "shortcut": shortcut})


# --------------------------------------------------------------------------- published sizes


@pytest.mark.parametrize("name, params, conv_mmacs", [
    ("resnet20", 269_722, 40.55),
    ("resnet56", 853_018, 125.49),
    ("resnet110", 1_727_962, 252.89),
])
def test_cifar_resnet_option_a_matches_the_papers(name, params, conv_mmacs):
    model = cifar(name)
    macs = count_macs(model, CIFAR)
    assert count_params(model) == params
    assert round(macs["conv"] / 1e6, 2) == conv_mmacs
    assert macs["linear"] == 640  # the classifier: 64 x 10
    assert macs["total"] == macs["conv"] + 640


def test_torchvision_resnet50_is_4_09_gmacs():
    with torch.device("meta"):  # shapes are all the count needs: no weights, no arithmetic
        model = build_model({"name": "resnet50", "num_classes": 1000})
    macs = count_macs(model, (3, 224, 224))
    assert round(macs["total"] / 1e9, 2) == 4.09
    assert macs["linear"] == 2048 * 1000
    assert count_params(model) == 25_557_032


def test_vgg16_cifar_matches_the_l1_paper():
    plain, l1 = cifar("vgg16"), cifar("vgg16_l1")
    assert isinstance(plain, CifarVGG) and isinstance(l1, CifarVGG)
    # Li et al. 2017, table 1: VGG-16 on CIFAR-10 has 1.5e7 parameters and 3.13e8 FLOPs
    assert round(count_macs(plain, CIFAR)["conv"] / 1e8, 2) == 3.13
    assert round(count_params(l1) / 1e7, 1) == 1.5
    assert isinstance(l1.classifier, nn.Sequential) and isinstance(plain.classifier, nn.Linear)
    assert l1(torch.zeros(2, *CIFAR)).shape == (2, 10)


def test_both_mac_counts_are_labelled_and_differ_as_documented():
    model = cifar("resnet20")
    c = complexity(model, CIFAR)
    assert c["params"] == 269_722
    assert c["macs"] == c["conv_macs"] + c["linear_macs"]
    assert c["tp_macs"] == count_tp_macs(model, CIFAR)
    assert c["tp_macs"] > c["macs"]  # torch-pruning adds BN, ReLU and pooling
    line = format_complexity(c)
    assert "params 269.72K" in line and "40.55M (conv+linear)" in line
    assert "(torch-pruning: +BN/ReLU/pool)" in line


def test_option_b_projects_and_option_a_pads():
    a, b = cifar("resnet20", "A"), cifar("resnet20", "B")
    assert any(isinstance(m, PadShortcut) for m in a.modules())
    assert not any(isinstance(m, PadShortcut) for m in b.modules())
    # two 1x1 projections (16->32, 32->64) with their BN
    assert count_params(b) - count_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    assert b(torch.zeros(2, *CIFAR)).shape == (2, 10)


def test_zero_init_residual_zeroes_each_blocks_last_bn():
    model = cifar("resnet20")
    assert zero_init_last_bn(model) == 9
    assert all(not blk.bn2.weight.detach().any() for blk in model.layer1)
    x = torch.randn(2, 16, 8, 8)
    model.eval()
    assert torch.allclose(model.layer1(x), torch.relu(x))  # blocks start as identities


# --------------------------------------------------------------------------- names


def test_unknown_architecture_lists_the_known_ones():
    msg = check_arch("resnet57")
    assert "did you mean 'resnet56'" in msg
    for name in ("resnet20", "resnet110", "vgg16", "vgg16_l1", "resnet18", "resnet50"):
        assert name in msg
    assert "\n" not in msg
    assert check_arch("resnet56") is None and check_arch("resnet50") is None
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model({"name": "nope", "num_classes": 10})


def test_cifar_names_shadow_torchvision_which_stays_reachable():
    import torchvision

    assert isinstance(cifar("vgg11"), CifarVGG)
    with torch.device("meta"):  # no 130M-parameter initialization
        tv = build_model({"name": "torchvision.vgg11", "num_classes": 10})
    assert isinstance(tv, torchvision.models.VGG)
    assert check_arch("torchvision.vgg11") is None
    assert check_arch("torchvision.resnet56") is not None  # not a torchvision model


def test_unknown_arch_in_a_config_is_a_one_line_error(tiny_config, cli):
    code, _, err = cli("run", tiny_config({"model": {"arch": "resnet57"}}))
    assert code == 2 and "Traceback" not in err
    assert "model.arch" in err and "resnet56" in err and "resnet50" in err


def test_torchvision_models_return_plain_logits_in_training():
    with torch.device("meta"):
        model = build_model({"name": "googlenet", "num_classes": 7}).train()
        out = model(torch.zeros(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)


# --------------------------------------------------------------------------- pretrained


def test_pretrained_weights_load_strictly(tmp_path):
    src = build_model({"name": "resnet18", "num_classes": 10})
    path = tmp_path / "r18.pth"
    torch.save(src.state_dict(), path)
    dst = load_pretrained(build_model({"name": "resnet18", "num_classes": 10}), path)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(),
                                                 dst.state_dict().values(), strict=True))
    # a pipeline checkpoint (its state_dict entry, `module.` prefixes) works too
    state = {f"module.{k}": v for k, v in src.state_dict().items()}
    wrapped = {"schema": 1, "state_dict": state}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    load_pretrained(build_model({"name": "resnet18", "num_classes": 10}), tmp_path / "ckpt.pt")


def test_pretrained_mismatch_corrupt_or_missing_is_one_line(tmp_path):
    model = build_model({"name": "resnet18", "num_classes": 10})
    torch.save(build_model({"name": "resnet18", "num_classes": 1000}).state_dict(),
               tmp_path / "imagenet.pth")
    with pytest.raises(CheckpointError) as e:
        load_pretrained(model, tmp_path / "imagenet.pth")
    msg = str(e.value)
    assert "imagenet.pth" in msg and "fc.weight" in msg and "(1000, 512)" in msg
    assert "10 classes" in msg and "\n" not in msg
    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("layer4")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError, match=r"missing, e\.g\. layer4"):
        load_pretrained(model, tmp_path / "partial.pth")
    (tmp_path / "junk.pth").write_bytes(b"this is not a weights file")
    with pytest.raises(CheckpointError, match="junk.pth: not a torch weights file"):
        load_pretrained(model, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(model, tmp_path / "absent.pth")


def test_pretrained_mismatch_through_the_cli(tiny_config, cli, tmp_path):
    bad = tmp_path / "wrong.pth"
    torch.save(cifar("resnet8", classes=10).state_dict(), bad)  # the tiny data has 4 classes
    code, _, err = cli("run", tiny_config({"model": {"pretrained": str(bad)}}))
    # found by the preflight, before any work: a usage error naming the key and the file
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "wrong.pth" in lines[0] and "fc.weight" in lines[0]
    assert "model.pretrained" in lines[0]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- pruned shapes


def test_shrink_to_rebuilds_a_pruned_option_a_network():
    model = cifar("resnet8", classes=4).eval()
    blk = model.layer2[0]
    keep = list(range(0, 32, 2))  # halve the block's output (and the shortcut's)
    blk.conv1.weight = nn.Parameter(blk.conv1.weight[keep].clone())
    blk.conv1.out_channels = 16
    for name in ("weight", "bias"):
        setattr(blk.bn1, name, nn.Parameter(getattr(blk.bn1, name)[keep].clone()))
    blk.bn1.running_mean = blk.bn1.running_mean[keep].clone()
    blk.bn1.running_var = blk.bn1.running_var[keep].clone()
    blk.bn1.num_features = 16
    blk.conv2.weight = nn.Parameter(blk.conv2.weight[:, keep].clone())
    blk.conv2.in_channels = 16
    blk.shortcut.set_maps([(i, 2 * i) for i in range(16)], 16, 32)  # maps are data too
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    state = model.state_dict()
    rebuilt = shrink_to(cifar("resnet8", classes=4), state)
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    assert rebuilt.layer2[0].conv1.out_channels == 16
    assert (rebuilt.layer2[0].shortcut.in_channels, rebuilt.layer2[0].shortcut.out_channels) == (
        16, 32)
    assert rebuilt.layer2[0].shortcut.out_index.tolist() == list(range(0, 32, 2))
    assert torch.allclose(rebuilt(x), expected, atol=1e-5)
    assert isinstance(rebuilt, CifarResNet)


def test_option_a_shortcut_pads_a_contiguous_block_and_scatters_other_maps():
    """The shortcut's two forward paths: a constant channel padding where the input lands
    in one contiguous block of output channels, `index_copy` for any other map; both give
    the same tensor, and the padded path exports to ONNX without a scatter."""
    torch.manual_seed(0)
    plain = PadShortcut(16, 32, 2)
    assert plain.block == (8, 8)
    spread = PadShortcut(16, 32, 2)
    spread.set_maps([(i, 2 * i) for i in range(16)], 16, 32)
    assert spread.block is None
    shifted = PadShortcut(16, 32, 2)
    shifted.set_maps([(i, 3 + i) for i in range(16)], 16, 32)
    assert shifted.block == (3, 13)
    dropped = PadShortcut(16, 32, 2)  # input channels 0 and 5 no longer carried
    dropped.set_maps([(i, 8 + i) for i in range(16) if i not in (0, 5)], 16, 32)
    assert dropped.block is None
    x = torch.randn(2, 16, 8, 8)
    for layer in (plain, shifted, spread, dropped):
        expected = torch.zeros(2, 32, 4, 4)
        for i, o in zip(layer.in_index.tolist(), layer.out_index.tolist(), strict=True):
            expected[:, o] = x[:, i, ::2, ::2]
        assert torch.equal(layer(x), expected)
    # the block is derived again from loaded maps
    loaded = PadShortcut(16, 32, 2)
    loaded.load_state_dict(shifted.state_dict())
    assert loaded.block == (3, 13)

    pytest.importorskip("onnx")
    import onnx

    from pipeline.onnxrt import to_onnx

    def ops(layer):
        proto = onnx.load_from_string(to_onnx(layer.eval(), x))
        return {n.op_type for n in proto.graph.node}

    assert "Pad" in ops(plain) and not ops(plain) & {"ScatterElements", "ScatterND"}
    assert ops(spread) & {"ScatterElements", "ScatterND", "IndexCopy"}
