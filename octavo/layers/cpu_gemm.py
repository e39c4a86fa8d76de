"""A float32 GEMM for the CPU's decode-step shapes: a few to a few hundred rows against a
weight packed once at load, AVX-512.

oneDNN's inner product and MKL's GEMMs run a decode step's linears well below what the machine
can do: at 8 rows a step is bound by reading the weights, and oneDNN streams them at about
17 GB/s where a plain sum reaches 25; at 32 rows it runs at about half the float32 peak. This
kernel packs each weight ``[N, K]`` into blocks of 32 output columns, ``[N / 32, K, 32]``, so
that one input's 32 outputs are one cache line pair, and computes a tile of up to 12 rows x 32
columns in 24 vector registers: per input, two weight loads, one broadcast per row, two FMAs
per row, with the weight prefetched 16 inputs ahead. Each thread takes whole column blocks, and
a block (``32 * K`` floats) stays in L2 while the row tiles go over it.

Measured on a 2-core AVX-512 machine with ``python -m octavo.benchmarks.cpu_linear --threads 2``
(SmolLM2-135M's shapes: all 30 layers' qkv / o / gate-up / down weights, so none stays in
cache), ms for the 120 linears:

====  ========  ======  ========  ======================
rows  F.linear  oneDNN  this one  MKL packed for 64 rows
====  ========  ======  ========  ======================
1     15.2      19.0    14.1
8     33.3      23.6    18.2
16    39.0      29.1    24.4
32    46.7      40.6    33.9
64    68.1      65.2    53.1      49.9
128   98.9      100.4   91.3
512   334.1     327.2   331.9
====  ========  ======  ========  ======================

Each output is a plain sequential float32 sum over the inputs, a different order from BLAS's
blocked sums: the rounding differences from ``F.linear`` are small and grow with K (against a
float64 reference, about 2e-4 at K = 1536 where ``F.linear`` is at 3e-5). Built on first use like
the other CPU kernels (``cpu_extension``), only where the CPU has AVX-512F; ``cpu_linear`` decides
which rows come here.
"""

from __future__ import annotations

from typing import Optional

import torch

from octavo.layers.cpu_extension import CppKernels, cpu_flags, switch_on

ENV_SWITCH = "OCTAVO_CPU_GEMM"

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <array>
#include <utility>

#ifndef __AVX512F__
#error "this kernel needs AVX-512F"
#endif

namespace {

constexpr int64_t kColumns = 32;   // output columns per packed block: two AVX-512 vectors
constexpr int kMaxRows = 12;       // rows per register tile: 24 accumulators of 32
constexpr int64_t kPrefetch = 16;  // inputs ahead of the one being multiplied
constexpr int64_t kBandMinTiles = 16;  // from 16 tiles (181+ rows) on, a band of rows per thread

// weight [N, K] -> [ceil(N / 32), K, 32], zero-padded: one input's 32 outputs are contiguous
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.dtype() == at::kFloat && weight.device().is_cpu(),
              "pack: a float32 CPU matrix [out_features, in_features]");
  auto w = weight.contiguous();
  const int64_t N = w.size(0), K = w.size(1), blocks = (N + kColumns - 1) / kColumns;
  auto packed = at::zeros({blocks, K, kColumns}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      for (int64_t c = 0; c < kColumns && b * kColumns + c < N; ++c) {
        const float* row = src + (b * kColumns + c) * K;
        float* column = dst + b * K * kColumns + c;
        for (int64_t k = 0; k < K; ++k) column[k * kColumns] = row[k];
      }
  });
  return packed;
}

// R rows of x times one packed block -> R x 32 outputs (masked where the block passes N)
template <int R>
void tile(const float* x, int64_t x_stride, const float* block, int64_t K, float* y, int64_t y_stride,
          const float* bias, __mmask16 mask0, __mmask16 mask1) {
  __m512 acc0[R], acc1[R];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    acc0[r] = _mm512_setzero_ps();
    acc1[r] = _mm512_setzero_ps();
  }
#pragma GCC unroll 2
  for (int64_t k = 0; k < K; ++k) {
    const float* w = block + k * kColumns;
    const float* ahead = block + std::min(k + kPrefetch, K - 1) * kColumns;  // never past the block
    _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ahead + 16), _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w);
    const __m512 w1 = _mm512_loadu_ps(w + 16);
#pragma GCC unroll 12
    for (int r = 0; r < R; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * x_stride + k]);
      acc0[r] = _mm512_fmadd_ps(xr, w0, acc0[r]);
      acc1[r] = _mm512_fmadd_ps(xr, w1, acc1[r]);
    }
  }
  const __m512 b0 = bias != nullptr ? _mm512_maskz_loadu_ps(mask0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias != nullptr ? _mm512_maskz_loadu_ps(mask1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    _mm512_mask_storeu_ps(y + r * y_stride, mask0, _mm512_add_ps(acc0[r], b0));
    _mm512_mask_storeu_ps(y + r * y_stride + 16, mask1, _mm512_add_ps(acc1[r], b1));
  }
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*, __mmask16,
                      __mmask16);
template <int... I>
constexpr std::array<Tile, sizeof...(I) + 1> tiles(std::integer_sequence<int, I...>) {
  return {nullptr, tile<I + 1>...};
}
constexpr auto kTiles = tiles(std::make_integer_sequence<int, kMaxRows>{});

inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : n <= 0 ? 0 : static_cast<__mmask16>((1u << n) - 1);
}

// x [M, K] (rows contiguous) -> x @ weight.T + bias [M, N], the weight given packed
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.dtype() == at::kFloat && x.device().is_cpu() && (x.size(1) <= 1 || x.stride(1) == 1),
              "linear: float32 CPU rows [M, K] with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.dtype() == at::kFloat && packed.is_contiguous() &&
              packed.size(2) == kColumns, "linear: a weight packed by octavo_cpu_gemm::pack");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0);
  TORCH_CHECK(packed.size(1) == K, "linear: the input has ", K, " features, the weight ", packed.size(1));
  TORCH_CHECK(N > (blocks - 1) * kColumns && N <= blocks * kColumns, "linear: ", N,
              " outputs do not fit a packed weight of ", blocks, " blocks");
  at::Tensor b;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dtype() == at::kFloat && b.numel() == N, "linear: one float32 bias per output");
    bp = b.data_ptr<float>();
  }
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = packed.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t xs = x.stride(0);
  const int64_t row_tiles = (M + kMaxRows - 1) / kMaxRows;
  // Tasks are (band of row tiles, column block). Decode-sized inputs keep one band: each thread
  // takes whole column blocks and the weight is read once. Long inputs get a band per thread, so
  // that a thread's rows of x stay in its own L2 while it goes over every block (the weight is
  // then read once per thread, which their arithmetic hides); and with few blocks for many
  // threads, more bands keep every thread busy.
  const int64_t threads = at::get_num_threads();
  int64_t bands = row_tiles >= kBandMinTiles ? std::min(threads, row_tiles) : 1;
  if (bands * blocks < threads) bands = std::min(row_tiles, (threads + blocks - 1) / blocks);
  at::parallel_for(0, bands * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t band = task / blocks, nb = task % blocks;
      const int64_t c0 = nb * kColumns, left = N - c0;
      const __mmask16 mask0 = lanes(left), mask1 = lanes(left - 16);
      // tile t covers rows [t * M / row_tiles, (t + 1) * M / row_tiles): 1..12 rows each
      for (int64_t t = band * row_tiles / bands; t < (band + 1) * row_tiles / bands; ++t) {
        const int64_t r0 = t * M / row_tiles, rows = (t + 1) * M / row_tiles - r0;
        kTiles[rows](xp + r0 * xs, xs, wp + nb * K * kColumns, K, yp + r0 * N + c0, N, bp ? bp + c0 : nullptr,
                     mask0, mask1);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(octavo_cpu_gemm, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int out_features, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(octavo_cpu_gemm, CPU, m) {
  m.impl("pack", &pack);
  m.impl("linear", &linear);
}
"""

_KERNELS = CppKernels("octavo_cpu_gemm", _SOURCE, "octavo_cpu_gemm", "linear",
                      "the float32 linears run through oneDNN instead")


def cpu_has_avx512() -> bool:
    return " avx512f" in cpu_flags()  # off Linux no way to tell here, so no kernel


def gemm_enabled() -> bool:
    """The switch (on unless ``OCTAVO_CPU_GEMM=0``) and a CPU with AVX-512F."""
    return switch_on(ENV_SWITCH) and cpu_has_avx512()


def load_gemm() -> bool:
    """Build (first time on this machine: about half a minute) and load the kernel; False, with
    a warning once, where that fails."""
    return gemm_enabled() and _KERNELS.load()


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [N, K]`` in the kernel's layout ``[ceil(N / 32), K, 32]``."""
    return torch.ops.octavo_cpu_gemm.pack(weight)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x @ weight.T + bias`` for float32 rows ``x [M, K]``, the weight given by ``pack``."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return torch.ops.octavo_cpu_gemm.linear(x, packed, out_features, bias)


def gemm_error() -> Optional[BaseException]:
    return _KERNELS.error
