"""ilmconvert.export and the export command: ONNX (both exporters) and pt2, runtime parity, metadata,
dynamic and fixed batch, failures that leave no file, one-line errors."""

from __future__ import annotations

import importlib
import json

import onnx
import onnxruntime as ort
import pytest
import torch
from timm.layers import LayerNorm2d
from torch import nn
from typer.testing import CliRunner

import ilmconvert
from helpers import TINY_MODEL
from ilmconvert.cli import app
from ilmconvert.nn import ILMNorm
from ilmconvert.nn.proxy import ProxyNormAct

runner = CliRunner()
#: the module behind ``ilmconvert.export``
export_module = importlib.import_module("ilmconvert.exporting")


class _Tiny(nn.Module):
    """GroupNorm + ReLU (pooled ILM; a Proxy Norm pair), timm's LayerNorm2d and a token LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU())
        self.ln2d = LayerNorm2d(32)
        self.conv = nn.Conv2d(32, 48, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(48)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.ln2d(self.stem(x)))
        return self.head(self.norm(x.flatten(2).transpose(1, 2)).mean(1))


def _tiny(method: str) -> nn.Module:
    torch.manual_seed(0)
    model = _Tiny().eval()
    report = ilmconvert.convert(model, method=method)
    assert len(report.converted) == (3 if method == "ilm" else 1)
    # move the function away from the preserve init: decoders and proxy parameters non-zero
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (ILMNorm, ProxyNormAct)):
                for p in m.parameters():
                    p.add_(0.1 * torch.randn_like(p))
    return model


def _ort(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("method", ["ilm", "proxy"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_matches_with_a_dynamic_batch_and_standard_ops(method, exporter, tmp_path):
    model = _tiny(method)
    path = tmp_path / "tiny.onnx"
    result = ilmconvert.export(model, path, exporter=exporter, input_size=(32, 32), label_names=list("abcde"))
    assert set(result.parity) == {1, 3} and max(result.parity.values()) <= 1e-5
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == ["tiny.onnx"]  # no temporary left
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"} and not proto.functions
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["input_size"]) == [3, 32, 32] and json.loads(meta["label_names"]) == list("abcde")
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(meta)
    x = torch.randn(5, 3, 32, 32)  # a batch the check did not use: the axis is dynamic
    with torch.no_grad():
        ref = model(x)
    assert float((_ort(path, x) - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_of_frozen_batchnorm_keeps_the_batch_axis_dynamic(exporter, tmp_path):
    """ILMFrozenBatchNorm runs BatchNorm's kernel on the batch viewed as one sample of B x C
    channels: the exported graph must still take any batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5), model[1].running_var.uniform_(0.5, 2.0)
    assert [c.target for c in ilmconvert.convert(model, batchnorm="frozen").converted] == ["ILMFrozenBatchNorm"]
    with torch.no_grad():
        for p in model[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path / "frozen.onnx"
    result = ilmconvert.export(model, path, exporter=exporter, input_size=(32, 32))
    assert max(result.parity.values()) <= 1e-5
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    assert float((_ort(path, x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_pt2_reloads_exactly_and_carries_the_metadata(tmp_path):
    model = _tiny("proxy")
    path = tmp_path / "tiny.pt2"
    result = ilmconvert.export(model, path, format="pt2", input_size=(32, 32))
    assert result.exact and max(result.parity.values()) <= 1e-5
    extra = {export_module.PT2_METADATA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(json.loads(extra[export_module.PT2_METADATA_FILE])["input_size"]) == [3, 32, 32]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        assert float((program.module()(x) - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_traced_layers_take_the_traceable_path(monkeypatch):
    """Under tracing no autograd Function runs and Proxy Norm's CPU ReLU fold (which reads s > 0) is off."""
    from ilmconvert.nn import fast_torch, proxy

    model = _tiny("proxy")
    ilmconvert.convert(model)  # the remaining LayerNorms become ILM
    used = []
    monkeypatch.setattr(fast_torch.PooledILM, "apply", lambda *a: used.append("pooled"))
    monkeypatch.setattr(fast_torch.TokenILM, "apply", lambda *a: used.append("token"))
    fold = proxy.ProxyGroupNormAct._folded_into_standardization
    monkeypatch.setattr(
        proxy.ProxyGroupNormAct, "_folded_into_standardization", lambda s, x: used.append("fold") or fold(s, x)
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(model, (x,), check_trace=False)
        y = torch.randn(3, 3, 32, 32)
        assert float((traced(y) - torch.jit.trace(model, (y,), check_trace=False)(y)).abs().max()) == 0.0
    assert used.count("fold") == 2 and "pooled" not in used and "token" not in used


def test_fixed_batch_failed_check_and_bad_arguments(tmp_path, monkeypatch):
    model = _tiny("ilm")
    path = tmp_path / "fixed.onnx"
    result = ilmconvert.export(model, path, exporter="torchscript", batch=2, input_size=(32, 32))
    assert set(result.parity) == {2}
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2

    # the written file computes something else: exit code 1, nothing left behind
    def noisy(result, device):
        run, exact = original(result, device)
        return (lambda x: run(x) + 1e-3), exact

    original = export_module._runner
    monkeypatch.setattr(export_module, "_runner", noisy)
    with pytest.raises(ilmconvert.ParityError, match="differs from the PyTorch model at batch 1") as err:
        ilmconvert.export(model, tmp_path / "bad.onnx", exporter="torchscript", input_size=(32, 32))
    assert err.value.exit_code == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]
    monkeypatch.setattr(export_module, "_runner", original)

    for kwargs, match in [
        ({"format": "tflite"}, "format must be one of onnx, pt2"),
        ({"exporter": "fx"}, "exporter must be one of dynamo, torchscript"),
        ({"batch": 0}, "batch must be 'dynamic' or a positive integer"),
        ({"input_size": (32,)}, "input size must be two positive integers"),
    ]:
        with pytest.raises(ilmconvert.ExportError, match=match):
            ilmconvert.export(model, tmp_path / "x.onnx", **kwargs)
    with pytest.raises(ilmconvert.ExportError, match="float32 model"):
        ilmconvert.export(_tiny("ilm").double(), tmp_path / "x.onnx")
    monkeypatch.setattr(export_module, "_ONNX_PACKAGES", ("onnx", "onnxruntime_is_not_installed"))
    with pytest.raises(ilmconvert.ExportError, match=r"pip install 'ilmconvert\[onnx\]'"):
        ilmconvert.export(model, tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A converted small GroupNorm ResNet checkpoint with timm's pretrained_cfg and label names."""
    torch.manual_seed(0)
    model = ilmconvert.create_model("timm:resnet18", pretrained=False, num_classes=3, **TINY_MODEL)
    ilmconvert.convert(model)
    folder = tmp_path_factory.mktemp("ckpt") / "ckpt"
    ilmconvert.save(model, folder)
    config = json.loads((folder / "config.json").read_text())
    # the fields the checkpoint writer adds (timm's names); here written by hand
    config["pretrained_cfg"] = {"input_size": [3, 48, 48], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    config["label_names"] = ["cat", "dog", "bird"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _cli(*args: str):
    return runner.invoke(app, ["export", *map(str, args)], terminal_width=200)


def test_cli_exports_onnx_and_pt2_with_the_checkpoints_input_description(checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    result = _cli(checkpoint, "--out", out, "--exporter", "torchscript")
    assert result.exit_code == 0, result.output
    assert "batch 1: max relative difference" in result.output and "batch 3" in result.output
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["input_size"]) == [3, 48, 48] and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(meta["label_names"]) == ["cat", "dog", "bird"] and json.loads(meta["source"])["architecture"]
    assert json.loads(meta["crop_pct"]) == 0.95  # not in config.json: from the rebuilt model's pretrained_cfg

    result = _cli(checkpoint, "--out", tmp_path / "m2.onnx", "--batch", "2", "--input-size", "40", "40")
    assert result.exit_code == 0, result.output
    shape = onnx.load(str(tmp_path / "m2.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in shape] == [2, 3, 40, 40]

    result = _cli(checkpoint, "--out", tmp_path / "m.pt2", "--format", "pt2")
    assert result.exit_code == 0, result.output
    assert "bit for bit" in result.output and (tmp_path / "m.pt2").is_file()


def test_cli_takes_the_format_from_the_extension(checkpoint, tmp_path):
    import torch

    result = _cli(checkpoint, "--out", tmp_path / "m.pt2")
    assert result.exit_code == 0, result.output
    assert "torch.export.load vs PyTorch" in result.output
    torch.export.load(tmp_path / "m.pt2")  # a torch.export archive, not ONNX
    result = _cli(checkpoint, "--out", tmp_path / "m.bin")
    assert result.exit_code == 2 and "cannot tell the format from the file name" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--format", "tflite"], "--format must be one of onnx, pt2"),
        (["--format", "pt2"], "format pt2 contradicts the file name"),
        (["--batch", "0"], "--batch must be 'dynamic' or a positive integer"),
        (["--batch", "many"], "--batch must be 'dynamic' or a positive integer"),
        (["--exporter", "fx"], "exporter must be one of dynamo, torchscript"),
        (["--opset", "3"], "--opset"),
        (["--input-size", "0", "7"], "--input-size"),
    ],
)
def test_cli_bad_flags_are_one_line_and_exit_2(checkpoint, tmp_path, args, message):
    result = _cli(checkpoint, "--out", tmp_path / "m.onnx", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and result.output.strip().count("\n") == 0
    assert not list(tmp_path.iterdir())


def test_cli_failed_check_exits_1_and_leaves_no_file(checkpoint, tmp_path, monkeypatch):
    def failing(model, result, *args):
        raise export_module.ParityError("the exported onnx differs from the PyTorch model at batch 1: test")

    monkeypatch.setattr(export_module, "_check", failing)
    result = _cli(checkpoint, "--out", tmp_path / "m.onnx", "--exporter", "torchscript")
    assert result.exit_code == 1 and "error: the exported onnx differs" in result.output
    assert not list(tmp_path.iterdir())
    result = _cli(tmp_path / "missing", "--out", tmp_path / "m.onnx")
    assert result.exit_code == 2 and "not a directory" in result.output
