"""Tests of the model zoo (at.models): names, sizes, wiring, taps, init and the training modes
the methods need (channels_last, bf16 autocast, double backprop)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.func import functional_call

from at.models import allowed_forms, build, is_known, parameter_count
from at.models.nin import NIN
from at.models.resnet import TappedResNet
from at.models.wrn import WideResNet

# One small member of each family (and the BN-free NIN), for the training-mode tests.
TINY = ["wrn-10-1", "nin-thin", "nin-thin-nobn", "resnet18"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: intra-op threads cost more in synchronisation than they save, the more
    # so on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def seeded(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build(name, **kwargs)


def images(batch: int = 2, size: int = 32, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=generator, dtype=dtype)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["wrn-10-1", "wrn-16-1", "wrn-16-2", "wrn-40-1", "wrn-40-2", "wrn-22-3", "wrn-28-10",
     "nin-thin", "nin-wide", "nin-thin-nobn", "nin-wide-nobn", "resnet18", "resnet34"],
)
def test_known_names(name):
    assert is_known(name)


BAD_NAMES = ["wrn-15-1", "wrn-16-0", "wrn-4-1", "wrn-0-1", "wrn-016-1", "wrn-16-1.5", "wrn-16",
             "WRN-16-1", " wrn-16-1", "nin-medium", "nin", "nin-thin-bn", "resnet50", "resnet",
             "", "wrn-\u0661\u0666-1"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_value_errors_naming_the_name_and_the_allowed_forms(name):
    assert not is_known(name)
    with pytest.raises(ValueError) as info:
        build(name)
    message = str(info.value)
    assert repr(name) in message
    assert allowed_forms() in message
    for form in ("wrn-D-K", "6n+4", "nin-thin", "nin-wide-nobn", "resnet18", "resnet34"):
        assert form in message


@pytest.mark.parametrize("name,why", [("wrn-15-1", "D=15"), ("wrn-16-0", "K=0")])
def test_bad_wrn_names_say_which_part_is_wrong(name, why):
    with pytest.raises(ValueError, match=why):
        build(name)


@pytest.mark.parametrize("name", [None, 16, ("wrn-16-1",)])
def test_non_string_names(name):
    assert not is_known(name)
    with pytest.raises(ValueError, match="allowed: 'wrn-D-K'"):
        build(name)


@pytest.mark.parametrize("num_classes", [0, -3, 2.0, True, "10"])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        build("wrn-10-1", num_classes=num_classes)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("name", ["wrn-16-1", "nin-thin", "nin-wide-nobn"])
def test_weights_on_a_cifar_model_is_an_error(name):
    with pytest.raises(ValueError, match=r"no pretrained weights.*resnet18, resnet34"):
        build(name, weights="imagenet")


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "imagenet21k", True])
def test_unknown_weights_on_a_resnet_is_an_error(weights):
    with pytest.raises(ValueError, match=r"weights for 'resnet18' must be one of"):
        build("resnet18", weights=weights)


@pytest.mark.parametrize(
    "name,enum,num_classes",
    [("resnet18", torchvision.models.ResNet18_Weights, 10),
     ("resnet18", torchvision.models.ResNet18_Weights, 1000),
     ("resnet34", torchvision.models.ResNet34_Weights, 10)],
)
def test_imagenet_weights_come_from_torchvision_v1_enum(monkeypatch, name, enum, num_classes):
    # A random state dict stands in for the download (no network here); torchvision's own
    # builder is run for real and loads whatever the enum member returns.
    torch.manual_seed(123)
    downloaded = getattr(torchvision.models, name)(weights=None).state_dict()
    asked = []

    def fake_get_state_dict(self, *args, **kwargs):
        asked.append(self)
        return downloaded

    monkeypatch.setattr(enum, "get_state_dict", fake_get_state_dict)
    model = seeded(name, seed=7, num_classes=num_classes, weights="imagenet")

    assert asked == [enum.IMAGENET1K_V1]
    state = model.state_dict()
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.bn2.running_var"):
        assert torch.equal(state[key], downloaded[key])
    assert model.fc.in_features == 512 and model.fc.out_features == num_classes
    fc_is_downloaded = torch.equal(state["fc.weight"], downloaded["fc.weight"])
    assert fc_is_downloaded == (num_classes == 1000)
    logits, taps = model(images(size=64))
    assert logits.shape == (2, num_classes) and len(taps) == 4


# --------------------------------------------------------------------------- parameter counts


def wrn_count_by_hand(depth: int, k: int, classes: int = 10) -> int:
    """conv kxk: k*k*cin*cout (no bias), BN: 2*c, linear: in*out + out."""
    n = (depth - 4) // 6
    stem = 3 * 3 * 3 * 16
    total = stem
    previous = 16
    for width in (16 * k, 32 * k, 64 * k):
        # first block of the group: in -> width, projection when the channel count changes
        total += 2 * previous + 9 * previous * width + 2 * width + 9 * width * width
        total += previous * width if previous != width else 0
        # the n - 1 other blocks: width -> width
        total += (n - 1) * (2 * width + 9 * width * width + 2 * width + 9 * width * width)
        previous = width
    return total + 2 * 64 * k + 64 * k * classes + classes


def test_wrn_16_1_count_worked_by_hand():
    # stem 3*3*3*16 = 432
    # group 0 (16 -> 16, 2 blocks, identity shortcuts): 2 * (32 + 2304 + 32 + 2304) = 9,344
    # group 1: (32 + 4,608 + 64 + 9,216 + 512) + (64 + 9,216 + 64 + 9,216) = 32,992
    # group 2: (64 + 18,432 + 128 + 36,864 + 2,048) + (128 + 36,864 + 128 + 36,864) = 131,520
    # head: BN 128 + linear 64*10 + 10 = 778;  total 175,066
    assert wrn_count_by_hand(16, 1) == 175_066
    assert parameter_count(build("wrn-16-1")) == 175_066


@pytest.mark.parametrize(
    "name,depth,k,paper_millions,precise_millions",
    [
        ("wrn-16-1", 16, 1, 0.2, 0.175),
        ("wrn-16-2", 16, 2, 0.7, 0.69),
        ("wrn-40-1", 40, 1, 0.6, 0.56),
        ("wrn-40-2", 40, 2, 2.2, 2.24),
    ],
)
def test_wrn_parameter_counts(name, depth, k, paper_millions, precise_millions):
    count = parameter_count(build(name))
    assert count == wrn_count_by_hand(depth, k)
    assert round(count / 1e6, 1) == paper_millions
    assert abs(count / 1e6 - precise_millions) <= 0.01 * precise_millions


@pytest.mark.parametrize("name,depth,k", [("wrn-22-3", 22, 3), ("wrn-10-1", 10, 1)])
def test_wrn_count_other_sizes_and_classes(name, depth, k):
    assert parameter_count(build(name, num_classes=100)) == wrn_count_by_hand(depth, k, 100)


def nin_count_by_hand(blocks, classes: int, batch_norm: bool) -> int:
    """blocks: (first kernel, a, b, c) with c = None for num_classes; conv weights k*k*cin*cout,
    plus per conv either BN (2*cout) or a bias (cout)."""
    total, cin = 0, 3
    for kernel, a, b, c in blocks:
        c = classes if c is None else c
        for k, cout in ((kernel, a), (1, b), (1, c)):
            total += k * k * cin * cout + (2 * cout if batch_norm else cout)
            cin = cout
    return total


WIDE = [(5, 192, 160, 96), (5, 192, 192, 192), (3, 192, 192, None)]
THIN = [(5, 96, 80, 48), (5, 96, 96, 96), (3, 96, 96, None)]


def test_nin_wide_conv_weights_worked_by_hand():
    # 5*5*3*192 + 192*160 + 160*96 = 14,400 + 30,720 + 15,360
    # 5*5*96*192 + 192*192 + 192*192 = 460,800 + 36,864 + 36,864
    # 3*3*192*192 + 192*192 + 192*10 = 331,776 + 36,864 + 1,920      -> 965,568
    conv_weights = sum(
        p.numel() for p in build("nin-wide").parameters() if p.dim() == 4
    )
    assert conv_weights == 965_568


@pytest.mark.parametrize(
    "name,blocks,batch_norm,expected,paper_millions",
    [
        ("nin-wide", WIDE, True, 968_404, 1.0),
        ("nin-wide-nobn", WIDE, False, 966_986, 1.0),
        ("nin-thin", THIN, True, 246_900, 0.2),
        ("nin-thin-nobn", THIN, False, 246_186, 0.2),
    ],
)
def test_nin_parameter_counts(name, blocks, batch_norm, expected, paper_millions):
    count = parameter_count(build(name))
    assert count == nin_count_by_hand(blocks, 10, batch_norm) == expected
    assert round(count / 1e6, 1) == paper_millions


def test_nin_count_with_other_classes():
    assert parameter_count(build("nin-thin", num_classes=100)) == nin_count_by_hand(THIN, 100, True)


@pytest.mark.parametrize(
    "name,imagenet_count", [("resnet18", 11_689_512), ("resnet34", 21_797_672)]
)
def test_resnet_parameter_counts(name, imagenet_count):
    # torchvision's documented sizes for 1000 classes; 10 classes drop 990 rows of the
    # 512-input classifier and 990 biases.
    assert parameter_count(build(name, num_classes=1000)) == imagenet_count
    assert parameter_count(build(name)) == imagenet_count - 990 * 512 - 990


def test_parameter_count_counts_only_trainable_parameters():
    model = build("wrn-10-1")
    total = parameter_count(model)
    model.fc.weight.requires_grad_(False)
    assert parameter_count(model) == total - model.fc.weight.numel()


# --------------------------------------------------------------------------- taps and wiring


@pytest.mark.parametrize(
    "name,size,logit_classes,tap_shapes",
    [
        ("wrn-16-2", 32, 10, [(32, 32, 32), (64, 16, 16), (128, 8, 8)]),
        ("wrn-10-1", 48, 10, [(16, 48, 48), (32, 24, 24), (64, 12, 12)]),
        ("nin-thin", 32, 10, [(48, 32, 32), (96, 16, 16), (10, 8, 8)]),
        ("nin-wide-nobn", 32, 10, [(96, 32, 32), (192, 16, 16), (10, 8, 8)]),
        ("resnet18", 64, 10, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]),
        ("resnet34", 32, 10, [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]),
    ],
)
def test_logits_and_tap_shapes(name, size, logit_classes, tap_shapes):
    logits, taps = seeded(name)(images(size=size))
    assert logits.shape == (2, logit_classes)
    assert [tuple(t.shape) for t in taps] == [(2, *s) for s in tap_shapes]


def test_nin_last_tap_has_num_classes_channels():
    logits, taps = seeded("nin-wide", num_classes=100)(images())
    assert logits.shape == (2, 100) and taps[2].shape == (2, 100, 8, 8)


def wrn_reference_forward(model: WideResNet, x: torch.Tensor):
    """The WRN written out as functions of the model's parameters (train-mode BN)."""
    p = dict(model.named_parameters())

    def bn_relu(t, prefix):
        return F.relu(F.batch_norm(t, None, None, p[f"{prefix}.weight"], p[f"{prefix}.bias"],
                                   training=True, eps=1e-5))

    n = (model.depth - 4) // 6
    out = F.conv2d(x, p["conv.weight"], padding=1)
    taps = []
    for group, stride in enumerate((1, 2, 2)):
        for i in range(n):
            base, s = f"group{group}.{i}", stride if i == 0 else 1
            pre = bn_relu(out, f"{base}.bn0")
            h = F.conv2d(pre, p[f"{base}.conv0.weight"], stride=s, padding=1)
            h = F.conv2d(bn_relu(h, f"{base}.bn1"), p[f"{base}.conv1.weight"], padding=1)
            projection = p.get(f"{base}.shortcut.weight")
            out = h + (out if projection is None else F.conv2d(pre, projection, stride=s))
        taps.append(out)
    features = bn_relu(out, "bn").mean(dim=(2, 3))
    return features @ p["fc.weight"].T + p["fc.bias"], taps


@pytest.mark.parametrize("name", ["wrn-10-1", "wrn-16-1", "wrn-16-2"])
def test_wrn_matches_the_architecture_written_out(name):
    model = seeded(name).double().train()
    x = images(dtype=torch.float64)
    logits, taps = model(x)
    ref_logits, ref_taps = wrn_reference_forward(model, x)
    torch.testing.assert_close(logits, ref_logits)
    for tap, ref in zip(taps, ref_taps):
        torch.testing.assert_close(tap, ref)


@pytest.mark.parametrize(
    "name,projected",
    [("wrn-16-1", {"group1.0", "group2.0"}), ("wrn-16-2", {"group0.0", "group1.0", "group2.0"}),
     ("wrn-40-1", {"group1.0", "group2.0"})],
)
def test_wrn_projection_shortcuts_only_where_channels_change(name, projected):
    model = build(name)
    with_projection = {
        n for n, m in model.named_modules() if getattr(m, "shortcut", None) is not None
    }
    assert with_projection == projected
    assert not any(isinstance(m, nn.Dropout) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def caffe_pool(x: torch.Tensor, kind: str) -> torch.Tensor:
    """3x3 stride-2 pooling, Caffe style (ceil mode): pad the bottom/right by one so the last
    window fits, and average a partial window over its in-bounds pixels only."""
    if kind == "max":
        return F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 3, 2)
    ones = torch.ones_like(x[:1, :1])
    window_sum = F.avg_pool2d(F.pad(x, (0, 1, 0, 1)), 3, 2) * 9
    window_size = F.avg_pool2d(F.pad(ones, (0, 1, 0, 1)), 3, 2) * 9
    return window_sum / window_size


def nin_reference_forward(model: NIN, x: torch.Tensor, blocks):
    """NIN written out (eval mode: dropout off, BN from running statistics)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    kernels = [k for spec in blocks for k in (spec[0], 1, 1)]
    assert [c.kernel_size[0] for c in convs] == kernels
    taps, out = [], x
    for i, conv in enumerate(convs):
        out = F.conv2d(out, conv.weight, conv.bias, padding=kernels[i] // 2)
        if bns:
            bn = bns[i]
            out = (out - bn.running_mean[:, None, None]) / torch.sqrt(
                bn.running_var[:, None, None] + bn.eps
            ) * bn.weight[:, None, None] + bn.bias[:, None, None]
        out = torch.clamp(out, min=0)
        if i % 3 == 2:
            taps.append(out)
            if i == 2:
                out = caffe_pool(out, "max")
            elif i == 5:
                out = caffe_pool(out, "avg")
    return out.mean(dim=(2, 3)), taps


@pytest.mark.parametrize(
    "name,blocks", [("nin-thin", THIN), ("nin-thin-nobn", THIN), ("nin-wide", WIDE)]
)
def test_nin_matches_the_architecture_written_out(name, blocks):
    model = seeded(name).double()
    # Non-trivial BN statistics, so that eval-mode BN is not nearly the identity.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    x = images(dtype=torch.float64)
    logits, taps = model(x)
    ref_logits, ref_taps = nin_reference_forward(model, x, blocks)
    torch.testing.assert_close(logits, ref_logits)
    for tap, ref in zip(taps, ref_taps):
        torch.testing.assert_close(tap, ref)


def test_nin_layers():
    with_bn, without_bn = build("nin-thin"), build("nin-thin-nobn")
    bn_layers = [m for m in with_bn.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_layers) == 9 and all(m.eps == 1e-3 for m in bn_layers)
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without_bn.modules())
    assert all(m.bias is not None for m in without_bn.modules() if isinstance(m, nn.Conv2d))
    for model in (with_bn, without_bn):
        assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]


def test_nin_dropout_is_active_in_training_and_seeded():
    model = seeded("nin-thin").train()
    x = images()
    torch.manual_seed(5)
    first, _ = model(x)
    torch.manual_seed(5)
    again, _ = model(x)
    torch.manual_seed(6)
    other, _ = model(x)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.allclose(first, other)
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0], rtol=0, atol=0)


def test_nin_rejects_bad_options():
    with pytest.raises(ValueError, match="layout"):
        NIN("medium")
    with pytest.raises(ValueError, match="dropout"):
        NIN("thin", dropout=1.0)


@pytest.mark.parametrize("name", ["nin-thin-nobn", "nin-wide-nobn"])
def test_nin_without_bn_has_sane_activations(name):
    model = seeded(name).eval()
    logits, taps = model(images(batch=8))
    assert torch.isfinite(logits).all()
    for t in [logits, *taps]:
        rms = t.pow(2).mean().sqrt().item()
        assert 0.1 < rms < 10, rms


def test_nin_without_bn_fits_a_small_batch():
    # The BN-free NIN must learn from its He init (N(0, 0.05^2), the original's, leaves the
    # thin network's loss flat at ln 10): a few SGD steps on 16 images lower the loss.
    torch.manual_seed(0)
    model = NIN("thin", batch_norm=False, dropout=0.0)
    x, y = images(batch=16, size=16), torch.arange(16) % 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(27):
        loss = F.cross_entropy(model(x)[0], y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.85 * losses[0], losses


def test_resnet_wraps_torchvision_and_matches_its_forward():
    model = seeded("resnet18")
    assert isinstance(model, TappedResNet)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.load_state_dict(model.state_dict())  # same keys as torchvision's
    model.eval(), reference.eval()
    seen = []
    for layer in (reference.layer1, reference.layer2, reference.layer3, reference.layer4):
        layer.register_forward_hook(lambda module, args, output: seen.append(output))
    x = images(size=64)
    logits, taps = model(x)
    torch.testing.assert_close(logits, reference(x))
    assert len(taps) == len(seen) == 4
    for tap, ref in zip(taps, seen):
        torch.testing.assert_close(tap, ref)


def test_tapped_resnet_refuses_other_networks():
    with pytest.raises(ValueError, match="torchvision ResNet"):
        TappedResNet(nn.Sequential(nn.Conv2d(3, 3, 1)))


# --------------------------------------------------------------------------- initialisation


def test_wrn_init_is_kaiming_normal_fan_in():
    model = seeded("wrn-40-2")
    # 64 -> 128 channels, 3x3: fan_in 576 (fan_out would be 1152: a factor sqrt(2) apart)
    conv = model.group2[0].conv0.weight
    he_std = (2 / 576) ** 0.5
    assert abs(conv.std().item() / he_std - 1) < 0.03
    assert abs(conv.mean().item()) < 0.05 * he_std
    fc = model.fc.weight
    assert abs(fc.std().item() / (2 / 128) ** 0.5 - 1) < 0.08
    assert torch.equal(model.fc.bias, torch.zeros(10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.bias, torch.zeros_like(m.bias))


def _bn_weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.weight.detach() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])


def test_wrn_bn_weights_are_uniform_by_default_as_the_authors_code():
    """U(0, 1): all in [0, 1), mean 1/2 and std 1/sqrt(12) (the moments of U(0, 1)), and the
    empirical CDF within the Kolmogorov-Smirnov bound of the line F(x) = x."""
    weights = torch.cat([_bn_weights(seeded("wrn-40-2", seed)) for seed in range(5)])
    n = weights.numel()   # 5 x 2704 BN channels
    assert weights.min() >= 0 and weights.max() < 1
    assert abs(weights.mean().item() - 0.5) < 4 * (1 / 12) ** 0.5 / n ** 0.5
    assert abs(weights.std().item() - (1 / 12) ** 0.5) < 0.02
    x = weights.sort().values.double()
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - x, x - (i - 1) / n).max().item()
    assert ks < 1.63 / n ** 0.5   # the KS test's 1% critical value


def test_wrn_bn_weights_are_ones_with_the_option_and_other_values_are_refused():
    torch.manual_seed(0)
    model = build("wrn-16-1", bn_weight_init="ones")
    weights = _bn_weights(model)
    assert torch.equal(weights, torch.ones_like(weights))
    with pytest.raises(ValueError, match="bn_weight_init"):
        WideResNet(16, 1, bn_weight_init="zeros")
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(12, 1)
    with pytest.raises(ValueError, match="width"):
        WideResNet(16, 0)


def test_nin_init_is_kaiming_normal_fan_in():
    model = seeded("nin-thin-nobn")
    conv = model.block2[0]  # 48 -> 96, 5x5: fan_in 1200, fan_out 2400
    assert abs(conv.weight.std().item() / (2 / 1200) ** 0.5 - 1) < 0.03
    assert torch.equal(conv.bias, torch.zeros(96))


@pytest.mark.parametrize("name", ["wrn-16-1", "nin-thin", "nin-wide-nobn", "resnet18"])
def test_same_seed_same_weights_other_seed_other_weights(name):
    first, again, other = seeded(name, 3), seeded(name, 3), seeded(name, 4)
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


# --------------------------------------------------------------------------- training modes


@pytest.mark.parametrize("name", TINY)
def test_channels_last(name):
    model = seeded(name).eval()
    x = images()
    ref_logits, ref_taps = model(x)
    fast = copy.deepcopy(model).to(memory_format=torch.channels_last)
    x_cl = x.to(memory_format=torch.channels_last)
    logits, taps = fast(x_cl)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    for tap, ref in zip(taps, ref_taps):
        torch.testing.assert_close(tap, ref, rtol=1e-4, atol=1e-5)
    fast.train()
    logits, taps = fast(x_cl)
    (F.cross_entropy(logits, torch.tensor([0, 1])) + sum(t.pow(2).mean() for t in taps)).backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast(name):
    model = seeded(name).eval()
    x = images()
    ref_logits, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, taps = model(x)
    assert logits.dtype == torch.bfloat16
    assert all(t.dtype == torch.bfloat16 for t in taps)
    error = (logits.float() - ref_logits).abs().max().item()
    assert error <= 0.03 * ref_logits.abs().max().item() + 0.02, error
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, taps = model(x)
        loss = F.cross_entropy(logits.float(), torch.tensor([3, 4]))
        loss = loss + sum(t.float().pow(2).mean() for t in taps)
    loss.backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("name", TINY)
def test_double_backprop_reaches_the_weights(name):
    model = seeded(name).train()
    x = images().requires_grad_(True)
    loss = F.cross_entropy(model(x)[0], torch.tensor([2, 9]))
    (input_grad,) = torch.autograd.grad(loss, x, create_graph=True)
    input_grad.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "name,size,weight",
    [
        ("wrn-10-1", 8, "conv.weight"),
        ("wrn-10-1", 8, "group1.0.bn1.weight"),
        ("nin-thin", 8, "block1.0.weight"),
        ("nin-thin-nobn", 8, "block2.2.weight"),
        ("resnet18", 64, "layer1.0.conv1.weight"),
    ],
)
def test_double_backprop_gradcheck(name, size, weight):
    """gradcheck of w -> dL/dx (the input gradient that grad-based AT trains through), in
    float64 with train-mode BN (and dropout, re-seeded so every evaluation draws the same
    masks). A Jacobian of that size is too big to check whole, so gradcheck sees a random
    sketch of it: w = w0 + t * u along a random unit direction u, and 4 random projections of
    dL/dx. The step (1e-7) is small enough not to cross a ReLU kink, where finite differences
    of a piecewise-linear network mean nothing. (Tiny spatial sizes would leave BN with 2
    values per channel, which makes the function too stiff for finite differences: hence 64x64
    for the ResNet.)"""
    model = seeded(name).double().train()
    x = images(size=size, dtype=torch.float64)
    y = torch.tensor([1, 6])
    w0 = dict(model.named_parameters())[weight].detach().clone()
    generator = torch.Generator().manual_seed(3)
    direction = torch.randn(w0.shape, generator=generator, dtype=torch.float64)
    direction /= direction.norm()
    projections = torch.randn(x.numel(), 4, generator=generator, dtype=torch.float64)

    def sketched_input_gradient(t):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_(True)
        logits, _ = functional_call(model, {weight: w0 + t * direction}, (xi,))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y), xi, create_graph=True)
        return g.flatten() @ projections

    t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sketched_input_gradient, (t,), eps=1e-7, atol=1e-5, rtol=1e-4)
