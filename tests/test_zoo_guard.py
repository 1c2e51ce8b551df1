"""The zoo sweep's guard against vacuous preservation checks (benchmarks/zoo/checks.py,
benchmarks/zoo/record.py) and its summary keeping the hand-written part of docs/zoo.md
(benchmarks/zoo/report.py)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import ilmconvert
from benchmarks.zoo.checks import (
    check_preservation,
    forward_outputs,
    norm_sensitivity,
    randomize_norm_affines,
    reinit_zero_weights,
)
from benchmarks.zoo.record import verdict
from benchmarks.zoo.report import HAND_WRITTEN, summarize


class _ZeroHead(nn.Module):
    """LayerNorm -> zero-initialized linear head (timm's MLP-Mixer, torchvision's ViT): every output is 0."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)))


class _ZeroBranch(nn.Module):
    """x + BN(conv(GN(x))) with a zero BatchNorm weight (SHViT, timm's global-context block): the
    GroupNorm does not reach the output, which is nonzero."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(2, 4)
        self.conv = nn.Conv2d(4, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        nn.init.zeros_(self.bn.weight)

    def forward(self, x):
        return x + self.bn(self.conv(self.norm(x)))


def _setup(model: nn.Module, shape) -> tuple:
    torch.manual_seed(0)
    model = model.double().eval()
    randomize_norm_affines(model)
    args = (torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),)
    return model, args, forward_outputs(model, args)


@pytest.mark.parametrize("net,shape", [(_ZeroHead, (2, 5, 8)), (_ZeroBranch, (2, 4, 3, 3))])
def test_a_network_whose_norms_do_not_reach_the_outputs_is_flagged_then_fixed_by_reinit(net, shape):
    model, args, before = _setup(net(), shape)
    assert norm_sensitivity(model, args, before) == 0.0
    ilmconvert.convert(model, init="preserve")
    # a broken conversion would pass too: the comparison proves nothing
    for p in (p for n, p in model.named_parameters() if "norm" in n):
        p.data.add_(1.0)
    kept = check_preservation(model, args, before)
    assert kept.rel_diff == 0.0
    assert kept.reference_zero == (net is _ZeroHead)

    model, args, before = _setup(net(), shape)
    assert reinit_zero_weights(model) == (["head"] if net is _ZeroHead else ["bn"])
    before = forward_outputs(model, args)
    assert norm_sensitivity(model, args, before) > 1e-3
    assert not check_preservation(model, args, before).reference_zero


def _rec(**kw) -> dict:
    return {"finite": True, "backward_ok": True, "save_load_exact": True, "dtype": "float64", "rel_diff": 0.0, **kw}


def test_verdict_fails_vacuous_checks():
    rec = _rec(reference_zero=True, norm_sensitivity=0.0)
    verdict(rec)
    assert rec["status"] == "fail" and rec["vacuous"] and "every original output is 0" in rec["fail_reason"]
    rec = _rec(reference_zero=False, norm_sensitivity=1e-12)
    verdict(rec)
    assert rec["status"] == "fail" and rec["vacuous"] and "1.0e-12 <= 1e-10" in rec["fail_reason"]
    rec = _rec(reference_zero=False, norm_sensitivity=0.05)
    verdict(rec)
    assert rec["status"] == "ok" and not rec["vacuous"] and rec["preserved"]


def _jsonl(tmp_path):
    rec = {"name": "a", "library": "timm", "family": "f", "status": "no_instance_norm"}
    path = tmp_path / "zoo.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    return path


def test_summarize_keeps_the_hand_written_part(tmp_path):
    jsonl, md = _jsonl(tmp_path), tmp_path / "zoo.md"
    summarize(jsonl, md)
    assert md.read_text().rstrip().endswith(HAND_WRITTEN)
    tail = f"{HAND_WRITTEN}\n\n## Notes\n\nWritten by hand.\n"
    md.write_text("# stale summary\n\n" + tail)
    summarize(jsonl, md)
    text = md.read_text()
    assert "stale" not in text and text.startswith("# Zoo sweep") and text.endswith("\n" + tail)
    summarize(jsonl, md)
    assert md.read_text() == text  # a fixed point


def test_summarize_refuses_a_file_without_the_marker(tmp_path):
    jsonl, md = _jsonl(tmp_path), tmp_path / "zoo.md"
    md.write_text("# written by hand\n")
    with pytest.raises(ValueError, match="no line"):
        summarize(jsonl, md)
    assert md.read_text() == "# written by hand\n"
