"""Fused elementwise kernels for float32 on the CPU: RMSNorm (with the residual add before it)
and SiLU-and-mul.

In PyTorch the residual add + RMSNorm of a Llama layer is about eight operators (add, pow,
mean, add, rsqrt, mul, mul), and ``silu(gate) * up`` three (chunk, silu, mul). Each reads and
writes the activations again and pays a dispatch; at a decode step of a small model that is
over 400 operator calls per step, and in a prompt chunk about 10% of the step. Here each is
one pass over a row: one loop nest per op, float32 throughout, the same formula as the
reference (``x * rsqrt(mean(x^2) + eps)``, then the weight; ``g / (1 + exp(-g)) * u``), only
the order of the sum of squares differs (a vector reduction).

Built on first use with ``torch.utils.cpp_extension`` (like ``cpu_paged``) and cached on disk.
Where it cannot be built, or with ``OCTAVO_CPU_FUSED_OPS=0`` (read when the layers are built), the
PyTorch forms stay; the tests
hold the two together (``tests/test_cpu_float32_paths.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from octavo.layers.cpu_extension import CppKernels, switch_on

ENV_SWITCH = "OCTAVO_CPU_FUSED_OPS"

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <cmath>
#include <tuple>

namespace {

constexpr int64_t kGrainElements = 16384;  // below this many elements per task, one thread

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.device().is_cpu(), name, ": float32 CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, name, ": [rows, hidden] with contiguous rows");
}

inline void norm_row(const float* r, const float* w, float* o, int64_t H, float eps) {
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < H; ++j) sq += r[j] * r[j];
  const float inv = 1.f / std::sqrt(sq / static_cast<float>(H) + eps);
#pragma omp simd
  for (int64_t j = 0; j < H; ++j) o[j] = w[j] * (r[j] * inv);
}

// x [T, H] -> weight * (x * rsqrt(mean(x^2) + eps))
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  auto w = weight.contiguous();
  const int64_t T = x.size(0), H = x.size(1), xs = x.stride(0);
  TORCH_CHECK(w.numel() == H && w.dtype() == at::kFloat, "rms_norm: one float32 weight per column");
  auto out = at::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, std::max<int64_t>(1, kGrainElements / H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) norm_row(xp + t * xs, wp, op + t * H, H, e);
  });
  return out;
}

// (x + residual) -> (rms_norm(x + residual), x + residual); the inputs are not modified
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                 const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(residual, "add_rms_norm");
  auto w = weight.contiguous();
  const int64_t T = x.size(0), H = x.size(1), xs = x.stride(0), rs = residual.stride(0);
  TORCH_CHECK(residual.size(0) == T && residual.size(1) == H, "add_rms_norm: x and residual differ in shape");
  TORCH_CHECK(w.numel() == H && w.dtype() == at::kFloat, "add_rms_norm: one float32 weight per column");
  auto out = at::empty({T, H}, x.options());
  auto sum = at::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, T, std::max<int64_t>(1, kGrainElements / H), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* a = xp + t * xs;
      const float* b = rp + t * rs;
      float* s = sp + t * H;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) s[j] = a[j] + b[j];
      norm_row(s, wp, op + t * H, H, e);
    }
  });
  return {out, sum};
}

// x [T, 2I] = [gate | up] -> silu(gate) * up [T, I]
at::Tensor silu_and_mul(const at::Tensor& x) {
  check_rows(x, "silu_and_mul");
  TORCH_CHECK(x.size(1) % 2 == 0, "silu_and_mul: an even number of columns");
  const int64_t T = x.size(0), I = x.size(1) / 2, xs = x.stride(0);
  auto out = at::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, std::max<int64_t>(1, kGrainElements / I), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* g = xp + t * xs;
      const float* u = g + I;
      float* o = op + t * I;
#pragma omp simd
      for (int64_t j = 0; j < I; ++j) o[j] = g[j] / (1.f + std::exp(-g[j])) * u[j];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(octavo_cpu_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(octavo_cpu_fused, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
}
"""

_KERNELS = CppKernels("octavo_cpu_fused", _SOURCE, "octavo_cpu_fused", "silu_and_mul",
                      "the PyTorch RMSNorm and SiLU operators run instead")


def fused_ops_enabled() -> bool:
    return switch_on(ENV_SWITCH)


def keep_pytorch_forms(model: torch.nn.Module) -> None:
    """Turn the fused kernels off in every layer of ``model``. For quantized models (FP8 / INT8
    activations, GGUF weights kept packed with bfloat16 linears): there the kernels' last-bit
    float32 differences from the PyTorch forms change the roundings of the quantized values, which
    add up over the layers; the default model's greedy answer to "What is the capital of France?"
    became a different sentence, and FP8 models parted from their reference."""
    for module in model.modules():
        if hasattr(module, "cpu_fused"):
            module.cpu_fused = False


def load_fused_ops() -> bool:
    """Build (first time on this machine: about half a minute) and load the kernels; False, with
    a warning once, where that fails."""
    return _KERNELS.load()


def use_fused(x: torch.Tensor) -> bool:
    """Whether ``x`` can go through these kernels: float32 rows on the CPU, outside autograd, the
    kernels built. (The switch is read by the layers when they are built.)"""
    return (x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2 and not torch.is_grad_enabled()
            and load_fused_ops())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.octavo_cpu_fused.rms_norm(_rows(x), weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.octavo_cpu_fused.add_rms_norm(_rows(x), _rows(residual), weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    return torch.ops.octavo_cpu_fused.silu_and_mul(_rows(x))


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def fused_ops_error() -> Optional[BaseException]:
    return _KERNELS.error
