"""The inspect / swap commands through typer's test runner: output, files, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import ilmconvert
from ilmconvert.cli import app

runner = CliRunner()


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """Rich sizes tables to the terminal; the test runner has none, so give it 200 columns."""
    from ilmconvert.cli import output

    monkeypatch.setattr(output.console, "width", 200)


def _run(*args: str):
    return runner.invoke(app, list(args), terminal_width=200)


def test_inspect_table_and_json():
    result = _run("inspect", "timm:resnet50_gn")
    assert result.exit_code == 0, result.output
    assert "ILMGroupNorm" in result.output and "converted 53 modules" in result.output
    result = _run("inspect", "resnet50_gn", "--json")
    data = json.loads(result.stdout)
    assert data["model"] == "resnet50_gn" and len(data["converted"]) == 53
    assert data["converted"][0]["num_key_groups"] == 4 and data["params_added"] == sum(
        c["params_added"] for c in data["converted"]
    )


def test_inspect_key_group_size_and_batchnorm_opt_in():
    data = json.loads(_run("inspect", "torchvision:resnet18", "--include-batchnorm", "--json", "-K", "1").stdout)
    assert data["function_changing"] and data["increase_percent"] == pytest.approx(2.792, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "resnt50"], "unknown timm model 'resnt50'; did you mean resnet50"),
        (["inspect", "torchvision:resnet50"], "nothing to convert in ResNet"),
        (["inspect", "resnet50_gn", "--norms", "gn,xx"], "unknown norm kind xx"),
        (["swap", "convnext_atto", "--out", "OUT"], "--no-pretrained"),
        (
            ["swap", "convnext_atto", "--no-pretrained", "--init", "zeros", "--out", "OUT"],
            "--init must be preserve or paper",
        ),
        (
            ["swap", "convnext_atto", "--no-pretrained", "--weights", "missing.safetensors", "--out", "OUT"],
            "does not exist",
        ),
    ],
)
def test_expected_mistakes_are_one_line_and_exit_2(args, message, tmp_path):
    args = [
        a.replace("OUT", str(tmp_path / "out")).replace("missing.safetensors", str(tmp_path / "missing.safetensors"))
        for a in args
    ]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_swap_verifies_saves_and_round_trips(tmp_path):
    out = tmp_path / "atto"
    result = _run("swap", "convnext_atto", "--no-pretrained", "--num-classes", "10", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "PASS preservation check" in result.output and "relative =" in result.output
    model = ilmconvert.load(out)
    assert model.head.fc.out_features == 10
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ilmconvert.load(out)(x))


def test_swap_with_a_weights_file_and_paper_init(tmp_path):
    import timm

    src = timm.create_model("resnet18", pretrained=False, norm_layer="groupnorm")
    weights = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(weights))
    out = tmp_path / "r18"
    result = _run("swap", "timm:resnet18", "--weights", str(weights), "--init", "paper", "-q", "--out", str(out))
    # timm's resnet18 uses BatchNorm unless built with norm_layer: the weights do not fit
    assert result.exit_code == 2 and "does not fit timm:resnet18" in result.stderr
    result = _run("swap", "timm:resnet50_gn", "--no-pretrained", "--init", "paper", "-q", "--out", str(out))
    assert result.exit_code == 0 and "function changed (init=paper" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["conversion"]["settings"]["init"] == "paper"


def test_proxy_methods_through_the_cli(tmp_path):
    shown = _run("inspect", "timm:resnet50_gn", "--method", "ilm+proxy")
    assert shown.exit_code == 0, shown.output
    assert "ILMProxyGroupNormAct" in shown.output and "ReLU (act1 -> Identity)" in shown.output
    out = tmp_path / "r18"
    swapped = _run("swap", "torchvision:resnet18", "--no-pretrained", "--include-batchnorm", "--method", "proxy",
                   "-q", "--out", str(out))
    assert swapped.exit_code == 0, swapped.output
    report = ilmconvert.load(out).ilm_conversion
    assert report.settings["method"] == "proxy"
    assert sum(c.target == "ProxyGroupNormAct" for c in report.converted) == 9  # stem + bn1 of the 8 re-traced blocks


def test_swap_refuses_a_foreign_output_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = _run("swap", "convnext_atto", "--no-pretrained", "--out", str(tmp_path))
    assert result.exit_code == 2 and "is not an ilmconvert checkpoint" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_inspect_builds_on_cpu_when_the_constructor_cannot_run_on_meta():
    """torchvision's RegNet computes its widths with tensors: meta fails, the CPU build is used."""
    result = _run("inspect", "torchvision:regnet_x_400mf", "--include-batchnorm", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["function_changing"]
