"""Calibration of BN -> GN conversions (ilmconvert.calibrate), frozen BatchNorm layers and
loading weights by position: small self-built networks, CPU, offline."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import timm
import torch
from torch import nn

import ilmconvert
from ilmconvert.calibrate import calibrate, distillation_loss, split_heldout
from ilmconvert.calibration_images import CalibrationError
from ilmconvert.models import load_state_dict_by_position, load_state_dict_checked
from ilmconvert.nn.baselines import FrozenBatchNorm, PlainGroupNorm
from ilmconvert.nn.frozen import ILMFrozenBatchNorm, ILMFrozenBatchNormAct

BNS = [
    (lambda: nn.BatchNorm1d(8), (5, 8)),
    (lambda: nn.BatchNorm1d(8), (5, 8, 7)),
    (lambda: nn.BatchNorm2d(32), (5, 32, 6, 6)),
    (lambda: nn.BatchNorm3d(16), (3, 16, 3, 4, 5)),
]


def _trained_bn(bn: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        c = bn.num_features
        bn.weight.copy_(1 + 0.5 * torch.randn(c, generator=g))
        bn.bias.copy_(0.5 * torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g))
    return bn.eval()


@pytest.mark.parametrize("make, shape", BNS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_frozen_layer_computes_batchnorm_eval_bit_for_bit_and_is_batch_independent(make, shape, dtype):
    bn = _trained_bn(make(), 0).to(dtype)
    frozen = ILMFrozenBatchNorm.from_norm(bn)
    frozen.train()  # frozen: training mode standardizes with the running statistics too
    x = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype) + 1
    expected = bn(x)
    y = frozen(x)
    assert torch.equal(y, expected)  # BatchNorm's own rounding, not only its function
    assert torch.equal(frozen(x[1:2]), y[1:2])
    assert frozen.running_mean.data_ptr() != bn.running_mean.data_ptr()  # copied, not shared
    if x.dim() == 4:  # channels-last in, channels-last out, the same numbers
        y_cl = frozen(x.contiguous(memory_format=torch.channels_last))
        assert y_cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(y_cl, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frozen_layer_keeps_batchnorm_bits_in_half_precision(dtype):
    """Under autocast (float32 parameters, half input) and cast whole (``.to(dtype)``)."""
    bn = _trained_bn(nn.BatchNorm2d(32), 5)
    frozen = ILMFrozenBatchNorm.from_norm(bn).eval()
    x = (3 * torch.randn(4, 32, 6, 6, generator=torch.Generator().manual_seed(1))).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(frozen(x), bn(x))
    assert torch.equal(frozen.to(dtype)(x), bn.to(dtype)(x))


def test_frozen_layer_gradients_match_standardize_then_rescale():
    """The one-kernel path (BatchNorm's inference kernel with a per-sample affine) against eqs. 1-2
    written out, float64, with an auto-encoder that is not at preserve init."""
    bn = _trained_bn(nn.BatchNorm2d(32), 4).double()
    frozen = ILMFrozenBatchNorm.from_norm(bn).double()
    with torch.no_grad():
        for fc in (frozen.decoder_mu, frozen.decoder_gamma):
            fc.weight.normal_(0, 0.5)
    x = torch.randn(3, 32, 5, 5, dtype=torch.float64, requires_grad=True)
    mean, var = frozen.running_mean, frozen.running_var

    def written_out(x):
        omega, beta = frozen.rescaling(*frozen.key_features(x))
        x_s = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + frozen.eps)
        return x_s * omega[:, :, None, None] + beta[:, :, None, None]

    weight = torch.randn(3, 32, 5, 5, dtype=torch.float64)
    params = [x, frozen.weight, frozen.bias, frozen.decoder_gamma.weight, frozen.decoder_mu.weight]
    got = torch.autograd.grad((frozen(x) * weight).sum(), params)
    want = torch.autograd.grad((written_out(x) * weight).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_frozen_act_keeps_activation_and_drop_objects():
    bn = _trained_bn(timm.layers.BatchNormAct2d(32, act_layer=nn.SiLU), 2)
    frozen = ILMFrozenBatchNormAct.from_norm(bn)
    assert frozen.act is bn.act and frozen.drop is bn.drop
    x = torch.randn(2, 32, 5, 5, dtype=torch.float64)
    bn.double(), frozen.double()
    assert torch.allclose(frozen(x), bn(x), rtol=0, atol=1e-12)


def test_frozen_layer_takes_the_reference_path_and_learns():
    frozen = ILMFrozenBatchNorm.from_norm(_trained_bn(nn.BatchNorm2d(32), 3))
    assert frozen.standardization is None  # the fast path does not know it
    frozen(torch.randn(4, 32, 3, 3)).square().sum().backward()
    assert frozen.decoder_gamma.weight.grad.abs().sum() > 0 and frozen.running_mean.grad is None


def test_frozen_refuses_batchnorm_without_running_statistics():
    with pytest.raises(ilmconvert.nn.UnsupportedNormError, match="running statistics"):
        ILMFrozenBatchNorm.from_norm(nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(ilmconvert.nn.UnsupportedNormError, match="2-d"):
        FrozenBatchNorm.from_norm(nn.BatchNorm1d(8))


def test_plain_group_norm_keeps_affine_and_activation():
    bn = _trained_bn(timm.layers.BatchNormAct2d(40, act_layer=nn.SiLU), 4)
    gn = PlainGroupNorm.from_norm(bn)
    assert gn.num_groups == 20 and gn.act is bn.act
    assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)


# ------------------------------------------------------------------------------------------ calibration
def _network(seed: int = 0) -> nn.Module:
    """conv-BN-ReLU x 3 + head, BN running statistics from real forward passes (cumulative)."""
    torch.manual_seed(seed)
    layers, c = [], 3
    for co, stride in ((16, 2), (32, 2), (32, 1)):
        layers += [nn.Conv2d(c, co, 3, stride, 1), nn.BatchNorm2d(co, momentum=None), nn.ReLU()]
        c = co
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    x = torch.randn(128, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5
    net.train()
    with torch.no_grad():
        net(x)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
    return net.eval()


def _images(n: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _converted(net: nn.Module, method: str) -> nn.Module:
    torch.manual_seed(0)  # ILM's W1 keeps nn.Linear's random init
    new = copy.deepcopy(net)
    ilmconvert.convert(new, batchnorm="gn", method=method)
    return new


def test_closed_form_recovers_batchnorm_exactly_where_groupnorm_can():
    """Every sample's channels have exactly the running mean and variance: with G = C, GroupNorm
    standardizes as BatchNorm does, and the fit must return BN's own affine. Every other G sees the
    same statistics in every sample (an affine map of BN's standardization), so "auto" recovers the
    function exactly too, with some G."""
    c = 64  # converted with G = 32: not BN's standardization before the fit
    bn = _trained_bn(nn.BatchNorm2d(c), 5).double()
    net = nn.Sequential(bn, nn.Flatten()).double().eval()
    z = torch.randn(40, c, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    z = (z - z.mean((2, 3), keepdim=True)) / z.std((2, 3), correction=0, keepdim=True)
    x = bn.running_mean.view(1, c, 1, 1) + bn.running_var.sqrt().view(1, c, 1, 1) * z
    for groups in (c, "auto"):
        new = copy.deepcopy(net)
        ilmconvert.convert(new, batchnorm="gn")
        report = calibrate(new, net, x, groups=groups, epochs=0, micro_batch=7)
        assert report.layers[0].fit_error < 1e-12 and report.layers[0].isolated_error < 1e-12
        assert report.stages["before"].relative_change > 0.1
        assert report.stages["closed_form"].relative_change < 1e-10
    new = copy.deepcopy(net)
    ilmconvert.convert(new, batchnorm="gn")
    calibrate(new, net, x, groups=c, epochs=0, micro_batch=7)
    assert new[0].num_groups == c
    torch.testing.assert_close(new[0].weight, bn.weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(new[0].bias, bn.bias, rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", ["ilm", "proxy", "ilm+proxy", "none"])
def test_calibration_brings_the_converted_network_closer(method):
    net = _network()
    new = copy.deepcopy(net)
    if method == "none":
        mapping = {nn.BatchNorm2d: ilmconvert.NormAdapter("bn", PlainGroupNorm)}
        ilmconvert.convert(new, mapping, batchnorm="gn")
    else:
        ilmconvert.convert(new, batchnorm="gn", method=method)
    report = calibrate(new, net, _images(), epochs=2, batch_size=16)
    before, fitted, distilled = (report.stages[s] for s in ("before", "closed_form", "distilled"))
    assert fitted.relative_change < 0.5 * before.relative_change
    assert distilled.relative_change <= fitted.relative_change * 1.05
    assert report.images_fit + report.images_heldout == 64 and len(report.worst_layers()) == 3
    assert [r.norm_groups for r in new.ilm_conversion.converted] == [layer.groups for layer in report.layers]


def test_heldout_images_are_never_used_in_the_fit():
    net, images = _network(), _images()
    first = _converted(net, "ilm")
    report = calibrate(first, net, images, epochs=1, batch_size=16, seed=3)
    poisoned = images.clone()
    poisoned[report.heldout_indices] = float("nan")  # any use in the fit would spread NaN
    second = _converted(net, "ilm")
    calibrate(second, net, poisoned, epochs=1, batch_size=16, seed=3)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    fit, held = split_heldout(64, 0.125, 3)
    assert sorted(fit.tolist() + held.tolist()) == list(range(64)) and len(held) == 8


def test_same_seed_same_parameters_other_seed_other_parameters():
    net, images = _network(), _images()
    runs = []
    for seed in (0, 0, 1):
        new = _converted(net, "ilm+proxy")
        calibrate(new, net, images, epochs=1, batch_size=16, seed=seed)
        runs.append(torch.cat([p.detach().flatten() for p in new.parameters()]))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_calibrate_refuses_a_network_without_converted_batchnorm():
    net = _network()
    with pytest.raises(CalibrationError, match="batchnorm='gn'"):
        calibrate(ilmconvert.convert(copy.deepcopy(net), method="none") and copy.deepcopy(net), net, _images())
    with pytest.raises(CalibrationError, match="at least 2"):
        calibrate(_converted(net, "ilm"), net, _images(1))


def test_distillation_loss_is_tempered_kl_plus_relative_feature_error():
    g = torch.Generator().manual_seed(4)
    out, target = (
        torch.randn(3, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 5, generator=g, dtype=torch.float64),
    )
    s, t = (
        torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
        torch.randn(3, 4, 2, generator=g, dtype=torch.float64),
    )
    temperature = 2.0
    p = torch.softmax(target / temperature, -1)  # the original's tempered distribution
    q = torch.softmax(out / temperature, -1)
    kl = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    relative = ((s - t) ** 2).sum() / (t**2).sum()
    torch.testing.assert_close(distillation_loss(out, target, temperature, [], 1.0), kl)
    torch.testing.assert_close(
        distillation_loss(out, target, temperature, [(s, t), (t, t)], 0.5), kl + 0.5 * relative / 2
    )
    assert float(distillation_loss(target, target, temperature, [(t, t)], 1.0)) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("feature_weight", [0.0, 1.0])
def test_distillation_trains_ilm_decoders_and_affine(feature_weight):
    """At preserve init W2 = W3 = 0, yet the decoders get gradient on the first step and move."""
    net = _network()
    new = _converted(net, "ilm")
    report = calibrate(new, net, _images(), epochs=1, batch_size=16, lr=1e-2, feature_weight=feature_weight)
    norms = report.distillation["first_step_gradient_norms"]
    assert norms["decoders"] > 0 and norms["affine"] > 0
    decoders = [m.decoder_gamma.weight for m in new.modules() if hasattr(m, "decoder_gamma")]
    assert decoders and all(w.abs().max() > 1e-4 for w in decoders)


@pytest.mark.parametrize("train", ["norms", "all"])
def test_distillation_trains_the_norms_only_or_everything(train):
    """``train="norms"`` leaves every convolution and the classifier bit for bit as they were;
    ``train="all"`` moves them too, and the report says which and how many parameters."""
    net = _network()
    new = _converted(net, "ilm")
    report = calibrate(new, net, _images(), epochs=1, batch_size=16, lr=1e-2, train=train)
    after = dict(new.named_modules())
    convs = [(a, after[name]) for name, a in net.named_modules() if isinstance(a, (nn.Conv2d, nn.Linear))]
    moved = [not torch.equal(a.weight, b.weight) for a, b in convs]
    assert len(convs) == 4 and moved == [train == "all"] * 4
    everything = sum(p.numel() for p in new.parameters())
    assert (report.distillation["parameters"] == everything) == (train == "all")
    assert ("network" in report.distillation["first_step_gradient_norms"]) == (train == "all")
    assert report.settings["train"] == train
    assert set(report.seconds) == {
        "reference",
        "before",
        "closed_form",
        "closed_form_heldout",
        "distillation",
        "distilled_heldout",
    }


def test_calibrate_refuses_an_unknown_train_setting_before_computing():
    net = _network()
    new = _converted(net, "ilm")
    state = copy.deepcopy(new.state_dict())
    with pytest.raises(CalibrationError, match="'norms' or 'all'"):
        calibrate(new, net, _images(), train="convs")
    assert all(torch.equal(v, new.state_dict()[k]) for k, v in state.items())


def test_fixed_group_count_is_the_largest_divisor_not_above():
    net = _network()
    new = _converted(net, "ilm")
    report = calibrate(new, net, _images(), groups=12, epochs=0)
    assert [layer.groups for layer in report.layers] == [8, 8, 8]


# ------------------------------------------------------------------------------------------ weights by position
def _renamed(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"_port.{i}.{k.rsplit('.', 1)[-1]}": v.clone() for i, (k, v) in enumerate(state.items())}


def test_weights_by_position_loads_a_renamed_state_dict_exactly():
    source, target = _network(0), _network(1)
    state = _renamed(source.state_dict())
    message = load_state_dict_checked(target, state)
    assert "missing" in message and "unexpected" in message and "--weights-by-position" in message
    assert load_state_dict_by_position(target, state) == ""
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_weights_by_position_refuses_count_and_shape_mismatch():
    target = _network(1)
    state = _renamed(_network(0).state_dict())
    fewer = dict(list(state.items())[:-1])
    assert "cannot match by position" in load_state_dict_by_position(target, fewer)
    reshaped = dict(state)
    first = next(iter(reshaped))
    reshaped[first] = reshaped[first][:, :2]
    assert "differs in shape" in load_state_dict_by_position(target, reshaped)
    assert "likely cause" in load_state_dict_checked(target, fewer)
    counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert load_state_dict_by_position(target, counters) == ""  # BN's counters aside


def _efficientnet_pytorch_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` renamed as EfficientNet-PyTorch names its tensors (its first three names are real)."""
    names = ["_conv_stem.weight", "_bn0.weight", "_bn0.bias", "_bn0.running_mean", "_bn0.running_var"]
    return {(names[i] if i < len(names) else f"_blocks.{i}"): v.clone() for i, v in enumerate(state.values())}


def test_weights_by_position_names_the_tensorflow_architecture_for_an_efficientnet_pytorch_port(tmp_path):
    from ilmconvert.models import ModelSourceError, create_model, tensorflow_port_note

    tf_net = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=10)
    state = {k: v for k, v in tf_net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert list(state)[:5] == ["conv_stem.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"]
    port = _efficientnet_pytorch_names(state)
    path = tmp_path / "port.pth"  # a pickled state dict keeps its order (safetensors sorts the names)
    torch.save(port, path)
    expected = r"tf_efficientnet_lite0, not efficientnet_lite0 \(pass timm:tf_efficientnet_lite0\)"
    with pytest.warns(UserWarning, match=expected):
        plain = create_model("timm:efficientnet_lite0", weights=path, weights_by_position=True, num_classes=10)
    assert isinstance(plain.bn1, torch.nn.BatchNorm2d) and plain.bn1.eps == 1e-5  # the mismatch the note names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tf = create_model("timm:tf_efficientnet_lite0", weights=path, weights_by_position=True, num_classes=10)
    assert tf.bn1.eps == 1e-3 and torch.equal(tf.conv_stem.weight, state["conv_stem.weight"])
    # the command line shows it as one line, not as Python's "file:line: UserWarning:" and source line
    done = subprocess.run(
        [sys.executable, "-m", "ilmconvert", "swap", "timm:efficientnet_lite0", "--weights", str(path),
         "--weights-by-position", "--num-classes", "10", "--batchnorm", "frozen", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [ln for ln in done.stderr.splitlines() if "tf_efficientnet_lite0" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: ") and "UserWarning" not in done.stderr, done.stderr
    # the same tensors in a .safetensors file come back sorted by name: refused, saying why
    import safetensors.torch

    sorted_path = tmp_path / "port.safetensors"
    safetensors.torch.save_file(port, sorted_path)
    with pytest.raises(ModelSourceError, match=r"sorted by name.*pickled state dict"):
        create_model("timm:tf_efficientnet_lite0", weights=sorted_path, weights_by_position=True, num_classes=10)
    # names from elsewhere, or no tf_ variant: no note
    assert tensorflow_port_note("timm", "efficientnet_lite0", state) == ""
    assert tensorflow_port_note("timm", "resnet18", port) == ""
    assert tensorflow_port_note("torchvision", "efficientnet_b0", port) == ""


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("batchnorm, method", [("frozen", "ilm"), ("frozen", "none"), ("gn", "ilm"), ("gn", "none")])
def test_frozen_and_calibrated_checkpoints_reload_bit_exactly(tmp_path, batchnorm, method):
    from ilmconvert.models import create_model

    torch.manual_seed(0)
    original = create_model("timm:resnet10t", pretrained=False, num_classes=10)
    original.train()
    with torch.no_grad():  # running statistics that are not BN's initial 0 / 1
        original(_images(16, 2) * 1.5)
    original.eval()
    net = copy.deepcopy(original)
    report = ilmconvert.convert(net, batchnorm=batchnorm, method=method)
    assert report.function_changing == (batchnorm == "gn")
    x = _images(4, 3)
    if batchnorm == "gn":
        calibrate(net, original, _images(24), epochs=1, batch_size=8)
        assert any(r.norm_groups != 32 for r in net.ilm_conversion.converted if r.channels >= 64)
    else:
        with torch.no_grad():
            assert (net(x) - original(x)).abs().max() <= 1e-5 * original(x).abs().max()
    ilmconvert.save(net, tmp_path / "ck")
    loaded = ilmconvert.load(tmp_path / "ck")
    net.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))


def test_load_images_takes_a_given_preprocessing(tmp_path):
    """A fine-tuned checkpoint's own input (here 8 px, mean 0.5, std 0.25) instead of the network's
    pretrained one; a network without a known preprocessing is refused without it."""
    from PIL import Image

    from ilmconvert.calibration_images import load_images

    pixels = torch.randint(0, 256, (3, 8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    for i, image in enumerate(pixels):
        Image.fromarray(image.numpy()).save(tmp_path / f"{i}.png")
    net = nn.Sequential(nn.Conv2d(3, 4, 3))
    pre = {"image_size": 8, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    got = load_images(tmp_path, 3, net, preprocess=pre)
    expected = (pixels.permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.25
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5)
    with pytest.raises(CalibrationError, match="no known pretrained preprocessing"):
        load_images(tmp_path, 3, net)


def test_image_files_follow_linked_class_folders_once(tmp_path):
    """An ImageFolder of linked class folders (as benchmarks/study_surgery.py makes) is read, and a
    link back up the tree is walked once, not forever."""
    from PIL import Image

    from ilmconvert.calibration_images import image_files

    store = tmp_path / "store" / "cat"
    store.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (4, 4)).save(store / f"{i}.png")
    (tmp_path / "imgs" / "train").mkdir(parents=True)
    (tmp_path / "imgs" / "train" / "cat").symlink_to(store, target_is_directory=True)
    (tmp_path / "imgs" / "train" / "loop").symlink_to(tmp_path / "imgs", target_is_directory=True)
    found = image_files(tmp_path / "imgs")
    assert [p.name for p in found] == ["0.png", "1.png"]
    assert all(p.parent == tmp_path / "imgs" / "train" / "cat" for p in found)
