"""The GN + Proxy Norm CPU kernel as a PyTorch operator with its autograd in C++ (issue 20).

:class:`~ilmconvert.nn.cpu_kernel.ProxyGroupNormActCPU` calls the kernel of
:mod:`ilmconvert.nn.cpu_kernel_source` through ``ctypes`` from a Python ``autograd.Function``: per layer
and step that is ``Function.apply``, ``saved_tensors``, the allocations and two 19- and 26-argument
``ctypes`` calls in Python, ~100 us per layer at batch 2-4 inside the Figure-1 network
(docs/performance.md, issue 20). This module compiles the same kernel source, unchanged, together with a
``TORCH_LIBRARY`` wrapper (:data:`OP_SOURCE`) into an operator

    ``torch.ops.ilmconvert_cpu.proxy_gn_act(x, weight, bias, proxy_weight, proxy_bias, output_weight?,
    output_bias?, q, groups, norm_eps, proxy_eps, act) -> Tensor``

registered for ``CPU`` (the forward alone: no grad, inference mode) and ``AutogradCPU`` (a
``torch::autograd::Function`` whose forward calls ``proxy_gn_forward_T`` and saves what
``proxy_gn_backward_T`` needs; its backward calls it). Same arguments and results as
``ProxyGroupNormActCPU`` (bit for bit: the same C++ entry points on the same buffers). Its backward is
not differentiable: with ``create_graph=True`` it raises (the Python path's ``once_differentiable``
raises when the result is differentiated again).

Built with ``torch.utils.cpp_extension.load`` (PyTorch's headers and ninja; ~17 s on a shared
2-core machine, against ~1 s for the header-free ``ctypes`` library) once per machine and cached
next to the ``ctypes`` library (:func:`~ilmconvert.nn.cpu_kernel.kernel_dir`), keyed by the source,
the flags, the compiler, the torch version and the CPU (``finetune`` builds it as a reported start-up
step, :func:`ilmconvert.train.prepare.prepare_finetune`). When the build or the load fails, one
``RuntimeWarning`` says so and the layers keep the ``ctypes`` path for the rest of the process.

The default on eager CPU wherever :func:`~ilmconvert.nn.cpu_kernel.proxy_applies` is True (the
``ctypes`` kernel's conditions): in the Figure-1 network's training step at batch 2 and 4 it took the
GN+PN / GN step-time ratio from 1.09-1.11 (``ctypes``) to 1.05-1.08, lower in each of five alternating
runs (docs/performance.md, issue 20). ``ILMCONVERT_CPU_OP=0`` in the environment or
:func:`set_enabled(False) <set_enabled>` keeps the ``ctypes`` path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from . import cpu_kernel
from .cpu_kernel_source import SOURCE

ENV = "ILMCONVERT_CPU_OP"
#: :func:`set_enabled`'s choice; None: the environment's
_ENABLED: bool | None = None
NAME = "ilmconvert_cpu_op"
FLAGS = ("-O3", "-fopenmp-simd")

#: the C++ wrapper compiled after :data:`~ilmconvert.nn.cpu_kernel_source.SOURCE` (whose ``extern "C"``
#: entry points it calls)
OP_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace ilmconvert_op {
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename T>
const T* cptr(const std::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->const_data_ptr<T>() : nullptr;
}
template <typename T>
T* mptr(const Tensor& t) { return t.defined() ? t.mutable_data_ptr<T>() : nullptr; }

// y, and one float64 workspace: (B, G, 2) group mean and rstd, then (4, C) the proxy's s, t, m, r
std::tuple<Tensor, Tensor> forward_impl(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pw,
                                        const Tensor& pb, const std::optional<Tensor>& ow,
                                        const std::optional<Tensor>& ob, const Tensor& q, int64_t groups,
                                        double norm_eps, double proxy_eps, int64_t act) {
  const int64_t B = x.size(0), C = x.size(1), P = x.numel() / (B * C);
  Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  Tensor work = at::empty({B * groups * 2 + 4 * C}, x.options().dtype(at::kDouble));
  double* stats = work.mutable_data_ptr<double>();
  double* coef = stats + B * groups * 2;
#define ILM_FWD(T, SFX)                                                                                          \
  proxy_gn_forward_##SFX(x.const_data_ptr<T>(), y.mutable_data_ptr<T>(), stats, coef, w.const_data_ptr<T>(),    \
                         b.const_data_ptr<T>(), pw.const_data_ptr<T>(), pb.const_data_ptr<T>(), cptr<T>(ow),    \
                         cptr<T>(ob), q.const_data_ptr<double>(), B, C, P, groups, q.size(0), act, norm_eps,    \
                         proxy_eps)
  if (x.scalar_type() == at::kFloat) {
    ILM_FWD(float, f32);
  } else {
    ILM_FWD(double, f64);
  }
#undef ILM_FWD
  return {y, work};
}

Tensor proxy_gn_act_cpu(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pw, const Tensor& pb,
                        const std::optional<Tensor>& ow, const std::optional<Tensor>& ob, const Tensor& q,
                        int64_t groups, double norm_eps, double proxy_eps, int64_t act) {
  return std::get<0>(forward_impl(x, w, b, pw, pb, ow, ob, q, groups, norm_eps, proxy_eps, act));
}

struct ProxyGroupNormAct : public torch::autograd::Function<ProxyGroupNormAct> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pw,
                        const Tensor& pb, const std::optional<Tensor>& ow, const std::optional<Tensor>& ob,
                        const Tensor& q, int64_t groups, double norm_eps, double proxy_eps, int64_t act) {
    auto [y, work] = forward_impl(x, w, b, pw, pb, ow, ob, q, groups, norm_eps, proxy_eps, act);
    ctx->save_for_backward({x, work, q, w, b, pw, pb, ow.value_or(Tensor()), ob.value_or(Tensor())});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["norm_eps"] = norm_eps;
    ctx->saved_data["proxy_eps"] = proxy_eps;
    ctx->saved_data["act"] = act;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "ilmconvert_cpu::proxy_gn_act has no double backward; "
                "set ILMCONVERT_CPU_OP=0 and ILMCONVERT_CPU_KERNEL=0 to differentiate twice");
    const auto s = ctx->get_saved_variables();
    const Tensor &x = s[0], &work = s[1], &q = s[2];
    const int64_t groups = ctx->saved_data["groups"].toInt(), act = ctx->saved_data["act"].toInt();
    const double norm_eps = ctx->saved_data["norm_eps"].toDouble();
    const double proxy_eps = ctx->saved_data["proxy_eps"].toDouble();
    Tensor dy = grad_outputs[0];
    if (dy.scalar_type() != x.scalar_type()) dy = dy.to(x.scalar_type());
    dy = dy.reshape(x.sizes()).contiguous();
    const int64_t B = x.size(0), C = x.size(1), P = x.numel() / (B * C);
    Tensor dx = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor g[6];
    for (int i = 0; i < 6; ++i) g[i] = s[3 + i].defined() ? at::empty_like(s[3 + i]) : Tensor();
    const double* stats = work.const_data_ptr<double>();
    const double* coef = stats + B * groups * 2;
#define ILM_BWD(T, SFX)                                                                                        \
  proxy_gn_backward_##SFX(x.const_data_ptr<T>(), dy.const_data_ptr<T>(), stats, coef, dx.mutable_data_ptr<T>(), \
                          mptr<T>(g[0]), mptr<T>(g[1]), mptr<T>(g[2]), mptr<T>(g[3]), mptr<T>(g[4]),          \
                          mptr<T>(g[5]), s[3].const_data_ptr<T>(), s[4].const_data_ptr<T>(),                    \
                          s[5].const_data_ptr<T>(), s[6].const_data_ptr<T>(), cptr<T>(s[7]), cptr<T>(s[8]),     \
                          q.const_data_ptr<double>(), B, C, P, groups, q.size(0), act, norm_eps, proxy_eps)
    if (x.scalar_type() == at::kFloat) {
      ILM_BWD(float, f32);
    } else {
      ILM_BWD(double, f64);
    }
#undef ILM_BWD
    return {dx, g[0], g[1], g[2], g[3], g[4], g[5], Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor proxy_gn_act_autograd(const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& pw, const Tensor& pb,
                             const std::optional<Tensor>& ow, const std::optional<Tensor>& ob, const Tensor& q,
                             int64_t groups, double norm_eps, double proxy_eps, int64_t act) {
  return ProxyGroupNormAct::apply(x, w, b, pw, pb, ow, ob, q, groups, norm_eps, proxy_eps, act);
}

}  // namespace ilmconvert_op

TORCH_LIBRARY(ilmconvert_cpu, m) {
  m.def("proxy_gn_act(Tensor x, Tensor weight, Tensor bias, Tensor proxy_weight, Tensor proxy_bias, "
        "Tensor? output_weight, Tensor? output_bias, Tensor q, int groups, float norm_eps, float proxy_eps, "
        "int act) -> Tensor");
}
TORCH_LIBRARY_IMPL(ilmconvert_cpu, CPU, m) { m.impl("proxy_gn_act", &ilmconvert_op::proxy_gn_act_cpu); }
TORCH_LIBRARY_IMPL(ilmconvert_cpu, AutogradCPU, m) { m.impl("proxy_gn_act", &ilmconvert_op::proxy_gn_act_autograd); }
"""

#: ``torch.ops.ilmconvert_cpu.proxy_gn_act.default`` once loaded, False when it could not be, None: not tried.
_OP: Any = None
#: Why the operator is unavailable (the warning's text), None while it is not known to be.
FAILURE: str | None = None


def enabled() -> bool:
    """Whether the operator is wanted: :func:`set_enabled`'s choice, else not ``ILMCONVERT_CPU_OP=0``."""
    return cpu_kernel.switched_on(_ENABLED, ENV)


def set_enabled(flag: bool | None) -> None:
    """Use the operator (True), the ``ctypes`` path (False), or the environment's choice (None)."""
    global _ENABLED
    _ENABLED = flag


def library_path(directory: Path | None = None) -> Path:
    """Where the operator's shared library is (or will be) cached for this source, torch, compiler and CPU.

    Raises:
        RuntimeError: no C++ compiler (``$CXX``, else ``c++``).
    """
    cxx = os.environ.get("CXX") or "c++"
    found = shutil.which(cxx)
    if found is None:
        raise RuntimeError(f"no C++ compiler found ({cxx!r}; set CXX)")
    version = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30).stdout
    key_text = "\0".join((SOURCE, OP_SOURCE, *FLAGS, *cpu_kernel.NATIVE, found, version, torch.__version__,
                          sys.platform, cpu_kernel._host_cpu()))
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    return (directory or cpu_kernel.kernel_dir()) / f"{NAME}_{key}.so"


def is_cached(directory: Path | None = None) -> bool:
    """Whether the operator is already compiled for this source, torch, compiler and CPU (False too
    when there is no compiler: then :func:`operator` warns and returns None at once)."""
    try:
        return library_path(directory).exists()
    except RuntimeError:
        return False


def _import_cpp_extension() -> Any:
    """``torch.utils.cpp_extension``, without the line it logs on import where CUDA_HOME exists but no
    CUDA runtime does ("No CUDA runtime is found, using CUDA_HOME=..."): this operator is CPU-only."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def load(directory: Path | None = None) -> Path:
    """Load the operator's library into this process, compiling it first where it is not cached; its path.

    Compiled with ``torch.utils.cpp_extension.load`` in a temporary directory (which loads it) and
    renamed into the cache (a concurrent process sees the whole library or none); ``-march=native``
    first, without it where that fails. Call once per process: ``TORCH_LIBRARY`` registers the
    ``ilmconvert_cpu`` namespace once.

    Raises:
        RuntimeError: no compiler or ninja, the build failed (its message included), or the load failed.
    """
    target = library_path(directory)
    if target.exists():
        torch.ops.load_library(str(target))
        return target
    cpp_extension = _import_cpp_extension()  # imports setuptools: only when building

    cpp_extension.verify_ninja_availability()  # raises RuntimeError: "Ninja is required ..."
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / f"{NAME}.cpp"
        src.write_text(SOURCE + OP_SOURCE)
        errors = []
        for extra in (cpu_kernel.NATIVE, ()):
            try:
                built = cpp_extension.load(NAME, [str(src)], extra_cflags=[*FLAGS, *extra], build_directory=tmp,
                                           is_python_module=False, verbose=False)
                break
            except Exception as err:  # a compile error
                errors.append(f"{type(err).__name__}: {err}")
        else:
            raise RuntimeError(f"building {NAME} failed: {errors[-1].strip()[-500:]}")
        os.replace(built, target)
    return target


def operator() -> Any:
    """``torch.ops.ilmconvert_cpu.proxy_gn_act.default``, built and loaded on first use; None (after one
    warning) when unavailable."""
    global _OP, FAILURE
    if _OP is None:
        try:
            load()
            _OP = torch.ops.ilmconvert_cpu.proxy_gn_act.default
        except Exception as err:  # no compiler / ninja / headers, compile error, unwritable cache, load error
            _OP, FAILURE = False, f"{type(err).__name__}: {err}"
            warnings.warn(
                f"ilmconvert: the GN + Proxy Norm C++ operator is unavailable ({FAILURE}); using the ctypes "
                f"kernel (same results). Set {ENV}=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _OP or None


def proxy_operator() -> Any:
    """The operator where it is wanted (:func:`enabled`) and loads, else None (take the ``ctypes`` path)."""
    if not enabled():
        return None
    return _OP or operator()
