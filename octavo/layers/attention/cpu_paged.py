"""Decode attention that reads K/V straight from the paged cache, for float32 on the CPU.

The reference decode (``TorchAttentionBackend._decode``) first gathers every sequence's blocks
into a padded ``[batch, keys, kv_heads, head_dim]`` copy, then runs SDPA over it: the cache is
read, the copy written, and the copy read again. At a batch of 64 sequences of ~200 tokens
that gather was 22% of a decode step on a 2-core machine. Decode attention does almost no
arithmetic per byte, so the kernel here walks each sequence's block table itself and reads
each cached key and value row once: one task per (sequence, KV head), the group's query heads
together, softmax online per block, float32 throughout. With AVX-512 and head sizes 64 or 128,
a KV head's queries (up to 4 or 2 at a time) and their output rows stay in registers for the
whole sequence and each row of K and V is loaded once per block for all of them (the generic
loop kept its accumulators in memory and ran compute-bound: 1.5 -> 0.6 ms per layer at 64
sequences of 192 tokens with the cache hot, 1.6 -> 1.15 ms with 30 layers' caches cold).

Neither PyTorch (SDPA, flex attention) nor inductor offers that for a paged cache on the CPU
today: a fused ``torch.compile`` of gather + softmax + weighted sum measured slower than the
gather + SDPA it replaces once its shapes are dynamic. So this is a small C++ loop nest, built
on first use with ``torch.utils.cpp_extension`` (the compiler inductor needs too) and cached
on disk. Where it cannot be built, or with ``OCTAVO_CPU_PAGED_DECODE=0``, the backend keeps
the gather + SDPA path; the tests hold the two together.
"""

from __future__ import annotations

from typing import Optional

import torch

from octavo.layers.cpu_extension import CppKernels, switch_on

ENV_SWITCH = "OCTAVO_CPU_PAGED_DECODE"

_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

// The running maximum starts finite: the build's -ffast-math (for a vector exp) assumes no
// infinities, and exp(kStart - score) is 0 for any real score.
constexpr float kStart = -1e30f;

// One block of the online softmax for one query row: the block's scores p[0, tokens) become
// their exponentials against the new running maximum, and their sum joins denom (rescaled
// first). Returns the factor the row's accumulator must be scaled by (1 if the maximum held).
inline float softmax_block(float* p, int64_t tokens, float& running_max, float& denom) {
  float block_max = kStart;
  for (int64_t t = 0; t < tokens; ++t) block_max = std::max(block_max, p[t]);
  const float new_max = std::max(running_max, block_max);
  const float correction = std::exp(running_max - new_max);  // 0 at the start
  running_max = new_max;
  denom *= correction;
  float block_sum = 0.f;
#pragma omp simd reduction(+ : block_sum)
  for (int64_t t = 0; t < tokens; ++t) {  // one vector exp for the block
    p[t] = std::exp(p[t] - new_max);
    block_sum += p[t];
  }
  denom += block_sum;
  return correction;
}

#ifdef __AVX512F__
// One KV head of one sequence for GC of its query heads, head_dim = 16 * NV: the queries and the
// GC output rows stay in registers for the whole sequence, each key and value row is loaded once
// per block and used for all GC heads. Same arithmetic as the generic loop below (float32 dot
// products, online softmax per block), only the order of the sums differs.
template <int NV, int GC>
void attend_kv_head(const float* q, const float* kp, const float* vp, const int32_t* table, int64_t len,
                    int64_t max_blocks, int64_t num_blocks, int64_t bs, int64_t block_stride, int64_t row_stride,
                    int64_t prefetch_floats, float scale, float* out, float* scores) {
  constexpr int64_t D = 16 * NV;
  __m512 qv[GC][NV], acc[GC][NV];
  float running_max[GC], denom[GC];
  for (int g = 0; g < GC; ++g) {
    for (int i = 0; i < NV; ++i) {
      qv[g][i] = _mm512_loadu_ps(q + g * D + 16 * i);
      acc[g][i] = _mm512_setzero_ps();
    }
    running_max[g] = kStart;
    denom[g] = 0.f;
  }
  for (int64_t blk = 0; blk * bs < len && blk < max_blocks; ++blk) {
    const int64_t phys = table[blk];
    TORCH_CHECK(phys >= 0 && phys < num_blocks, "block table entry out of range");
    const int64_t tokens = std::min(bs, len - blk * bs);
    const float* kb = kp + phys * block_stride;
    const float* vb = vp + phys * block_stride;
    // The next block sits elsewhere: fetch it early, every head's rows of it on the task's first
    // pass (prefetch_floats = the row), so the passes of the other heads find it in cache.
    if (prefetch_floats > 0 && (blk + 1) * bs < len && blk + 1 < max_blocks) {
      const int64_t next = table[blk + 1];
      if (next >= 0 && next < num_blocks) {
        const char* nk = reinterpret_cast<const char*>(kp + next * block_stride);
        const char* nv = reinterpret_cast<const char*>(vp + next * block_stride);
        for (int64_t t = 0; t < bs; ++t)
          for (int64_t off = 0; off < prefetch_floats * 4; off += 64) {
            __builtin_prefetch(nk + t * row_stride * 4 + off);
            __builtin_prefetch(nv + t * row_stride * 4 + off);
          }
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const float* k = kb + t * row_stride;
      __m512 kv[NV];
      for (int i = 0; i < NV; ++i) kv[i] = _mm512_loadu_ps(k + 16 * i);
      for (int g = 0; g < GC; ++g) {
        __m512 dot = _mm512_mul_ps(qv[g][0], kv[0]);
        for (int i = 1; i < NV; ++i) dot = _mm512_fmadd_ps(qv[g][i], kv[i], dot);
        scores[g * bs + t] = _mm512_reduce_add_ps(dot) * scale;
      }
    }
    for (int g = 0; g < GC; ++g) {
      const float correction = softmax_block(scores + g * bs, tokens, running_max[g], denom[g]);
      if (correction != 1.f) {
        const __m512 c = _mm512_set1_ps(correction);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], c);
      }
    }
    for (int64_t t = 0; t < tokens; ++t) {
      const float* v = vb + t * row_stride;
      __m512 vv[NV];
      for (int i = 0; i < NV; ++i) vv[i] = _mm512_loadu_ps(v + 16 * i);
      for (int g = 0; g < GC; ++g) {
        const __m512 pt = _mm512_set1_ps(scores[g * bs + t]);
        for (int i = 0; i < NV; ++i) acc[g][i] = _mm512_fmadd_ps(pt, vv[i], acc[g][i]);
      }
    }
  }
  for (int g = 0; g < GC; ++g) {
    const __m512 inv = _mm512_set1_ps(denom[g] > 0.f ? 1.f / denom[g] : 0.f);
    for (int i = 0; i < NV; ++i) _mm512_storeu_ps(out + g * D + 16 * i, _mm512_mul_ps(acc[g][i], inv));
  }
}

using HeadFn = void (*)(const float*, const float*, const float*, const int32_t*, int64_t, int64_t, int64_t,
                        int64_t, int64_t, int64_t, int64_t, float, float*, float*);

// The register-resident form for head_dim 64 (up to 4 query heads at a time) and 128 (up to 2);
// nullptr: the generic loop.
HeadFn head_fn(int64_t D, int64_t gc) {
  if (D == 64) {
    switch (gc) {
      case 1: return &attend_kv_head<4, 1>;
      case 2: return &attend_kv_head<4, 2>;
      case 3: return &attend_kv_head<4, 3>;
      case 4: return &attend_kv_head<4, 4>;
    }
  } else if (D == 128) {
    switch (gc) {
      case 1: return &attend_kv_head<8, 1>;
      case 2: return &attend_kv_head<8, 2>;
    }
  }
  return nullptr;
}

constexpr int64_t max_chunk(int64_t D) { return D == 64 ? 4 : D == 128 ? 2 : 0; }
#endif

// query [B, Hq, D], kv_cache [2, N, bs, Hkv, D] (contiguous), block_tables [B, max_blocks] int32,
// seq_lens [B] int32 -> out [B, Hq, D]. Sequence b sees its first seq_lens[b] cached tokens.
at::Tensor paged_decode(const at::Tensor& query, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                        const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(query.dtype() == at::kFloat && kv_cache.dtype() == at::kFloat, "float32 only");
  TORCH_CHECK(block_tables.dtype() == at::kInt && seq_lens.dtype() == at::kInt, "int32 tables and lengths");
  TORCH_CHECK(query.dim() == 3 && kv_cache.dim() == 5, "query [B, Hq, D], kv_cache [2, N, bs, Hkv, D]");
  auto q = query.contiguous();
  auto cache = kv_cache.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t num_blocks = cache.size(1), bs = cache.size(2), Hkv = cache.size(3);
  TORCH_CHECK(cache.size(4) == D && Hq % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(tables.size(0) >= B && lens.size(0) >= B, "one table and length per sequence");
  const int64_t G = Hq / Hkv, max_blocks = tables.size(1);
  auto out = at::empty({B, Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = cache.data_ptr<float>();
  const float* vp = kp + num_blocks * bs * Hkv * D;
  const int32_t* tp = tables.data_ptr<int32_t>();
  const int32_t* lp = lens.data_ptr<int32_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t row_stride = Hkv * D;  // between tokens of a block
  const int64_t block_stride = bs * Hkv * D;
  // One task per sequence reads its blocks front to back (K then V rows of all heads are
  // contiguous); with fewer sequences than threads a task takes one KV head instead.
  const int64_t heads_per_task = B >= 2 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_seq = Hkv / heads_per_task;
  at::parallel_for(0, B * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = heads_per_task * G;  // query heads of a task
    std::vector<float> acc(rows * D), scores(rows * bs), running_max(rows), denom(rows);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq, h0 = (task % tasks_per_seq) * heads_per_task;
      const int64_t len = lp[b];
      const float* qb = qp + (b * Hq + h0 * G) * D;
#ifdef __AVX512F__
      if (max_chunk(D) > 0 && static_cast<int64_t>(scores.size()) >= std::min(G, max_chunk(D)) * bs) {
        for (int64_t hh = 0; hh < heads_per_task; ++hh) {
          for (int64_t g0 = 0; g0 < G; g0 += max_chunk(D)) {
            const int64_t gc = std::min(max_chunk(D), G - g0);
            const int64_t r = hh * G + g0;
            const int64_t prefetch = hh == 0 && g0 == 0 ? heads_per_task * D : 0;  // from this head on
            head_fn(D, gc)(qb + r * D, kp + (h0 + hh) * D, vp + (h0 + hh) * D, tp + b * max_blocks, len, max_blocks,
                           num_blocks, bs, block_stride, row_stride, prefetch, fscale,
                           op + (b * Hq + h0 * G + r) * D, scores.data());
          }
        }
        continue;
      }
#endif
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(running_max.begin(), running_max.end(), kStart);
      std::fill(denom.begin(), denom.end(), 0.f);
      for (int64_t blk = 0; blk * bs < len && blk < max_blocks; ++blk) {
        const int64_t phys = tp[b * max_blocks + blk];
        TORCH_CHECK(phys >= 0 && phys < num_blocks, "block table entry out of range");
        const int64_t tokens = std::min(bs, len - blk * bs);
        const float* kb = kp + phys * block_stride + h0 * D;
        const float* vb = vp + phys * block_stride + h0 * D;
        if ((blk + 1) * bs < len && blk + 1 < max_blocks) {  // the next block sits elsewhere: fetch it early
          const int64_t next = tp[b * max_blocks + blk + 1];
          if (next >= 0 && next < num_blocks) {
            const char* nk = reinterpret_cast<const char*>(kp + next * block_stride + h0 * D);
            const char* nv = reinterpret_cast<const char*>(vp + next * block_stride + h0 * D);
            for (int64_t t = 0; t < bs; ++t)
              for (int64_t off = 0; off < heads_per_task * D * 4; off += 64) {
                __builtin_prefetch(nk + t * row_stride * 4 + off);
                __builtin_prefetch(nv + t * row_stride * 4 + off);
              }
          }
        }
        // scores, token by token: each token's rows of this task's heads are read in order
        for (int64_t t = 0; t < tokens; ++t) {
          for (int64_t hh = 0; hh < heads_per_task; ++hh) {
            const float* k = kb + t * row_stride + hh * D;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = hh * G + g;
              const float* qg = qb + r * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
              scores[r * bs + t] = dot * fscale;
            }
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float correction = softmax_block(scores.data() + r * bs, tokens, running_max[r], denom[r]);
          if (correction != 1.f) {
            float* a = acc.data() + r * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] *= correction;
          }
        }
        // weighted values, token by token in the same order
        for (int64_t t = 0; t < tokens; ++t) {
          for (int64_t hh = 0; hh < heads_per_task; ++hh) {
            const float* v = vb + t * row_stride + hh * D;
            for (int64_t g = 0; g < G; ++g) {
              const int64_t r = hh * G + g;
              const float pt = scores[r * bs + t];
              float* a = acc.data() + r * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += pt * v[d];
            }
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* o = op + (b * Hq + h0 * G + r) * D;
        const float* a = acc.data() + r * D;
        const float inv = denom[r] > 0.f ? 1.f / denom[r] : 0.f;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = a[d] * inv;
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(octavo_cpu, m) {
  m.def("paged_decode(Tensor query, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(octavo_cpu, CPU, m) {
  m.impl("paged_decode", &paged_decode);
}
"""

_KERNELS = CppKernels("octavo_cpu_paged", _SOURCE, "octavo_cpu", "paged_decode",
                      "decode attention gathers K/V and runs SDPA instead")


def paged_decode_enabled() -> bool:
    return switch_on(ENV_SWITCH)


def load_paged_decode() -> bool:
    """Build (first time on this machine: about a minute) and load the kernel; False, with a
    warning once, where that fails."""
    return _KERNELS.load()


def paged_decode(query: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """query [B, Hq, D] over each sequence's first ``seq_lens[b]`` cached tokens -> [B, Hq, D]."""
    return torch.ops.octavo_cpu.paged_decode(query, kv_cache, block_tables, seq_lens, scale)


def paged_decode_error() -> Optional[BaseException]:
    return _KERNELS.error
