"""Conversion speed and memory on a large network (issue 3): ``inspect`` / ``swap`` stay fast.

Builds ``--model`` (default timm ``vit_giant_patch14_224``, ~1 B parameters) with random weights,
then times ``ilmconvert.convert`` alone (``--repeats`` fresh conversions are not possible on one
network, so the model is rebuilt only once and converted once; the build time is reported apart)
and samples the process RSS every millisecond during the conversion. The claim to check: the
conversion takes < 3 s beyond building the model and the peak RSS during it stays under 1.1x the
original model's memory (no copy of the network).

Usage::

    HF_HUB_OFFLINE=1 nice -n 19 python benchmarks/convert_speed.py [--model vit_giant_patch14_224]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a background thread; ``peak`` is the largest value seen."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:vit_giant_patch14_224")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the conversion")
    args = p.parse_args()

    import torch

    import ilmconvert

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = ilmconvert.create_model(args.model, pretrained=False)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    import gc

    gc.collect()
    rss_before = rss_bytes()

    prof = None
    if args.profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        report = ilmconvert.convert(model)
        convert_s = time.perf_counter() - t0
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    result = {
        "model": args.model,
        "params": params,
        "model_mb": model_bytes / 2**20,
        "build_s": build_s,
        "convert_s": convert_s,
        "norms_converted": len(report.converted),
        "params_added": report.params_added,
        "rss_before_mb": rss_before / 2**20,
        "rss_peak_during_convert_mb": peak.peak / 2**20,
        "extra_peak_mb": (peak.peak - rss_before) / 2**20,
        "peak_over_rss_before": peak.peak / rss_before,
        "extra_over_model": (peak.peak - rss_before) / model_bytes,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
