// A decode step's attention on CPU: each row's one new query token against its cached keys and values.
//
// One task per (row, key-value head): the query heads sharing that key-value head (grouped-query
// attention) read its keys and values once, scores q.k * scale, a softmax, and the weighted sum of the
// values, all in registers and one small scratch row. torch's form of the same (two batched matmuls and a
// softmax, madapt.serve.decode_attention) pays a per-matrix overhead for 3x64 by 64xW products that
// dominates at decode shapes. A row's result does not depend on the other rows (tasks never mix rows), and
// masked columns weigh exactly 0.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "lanes.h"

namespace {

using madapt::exp_lanes;
using madapt::Lanes;
using madapt::LANES;
using madapt::load;
using madapt::store;
using madapt::total;

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// softmax over `width` scores in place (the scratch row has room for a whole last vector).
void softmax(float* row, int64_t width) {
  float top = NEG_INF;
  for (int64_t w = 0; w < width; ++w) top = std::max(top, row[w]);
  if (top == NEG_INF) {  // every column masked: nothing to attend to, the output is 0
    std::fill(row, row + width, 0.0f);
    return;
  }
  std::fill(row + width, row + (width + LANES - 1) / LANES * LANES, NEG_INF);
  float sum = 0;
  for (int64_t w = 0; w < width; w += LANES) {
    store(row + w, exp_lanes(load(row + w) - top));
  }
  for (int64_t w = 0; w < width; ++w) sum += row[w];
  for (int64_t w = 0; w < width; ++w) row[w] /= sum;
}

// Asks for a head's column (`N` cache lines of 16 floats) ahead of its use.
template <int N>
inline void prefetch(const float* column) {
  for (int j = 0; j < N; ++j) __builtin_prefetch(column + j * LANES);
}

// The `groups` query heads (`DIM` = N * 16 floats each) that share one key-value head, over `width` columns
// whose keys and values are `k_step` and `v_step` floats apart. `scores`: groups * padded width floats.
// `next_k`, `next_v`: the keys and values of the task after this one (or null: this task's own values). The
// cache's columns come from memory in short runs, one (row, head) at a time, too short for the hardware's
// prefetcher: while the keys stream past, those are asked for, so the loops after find them in cache.
template <int N>
void attend(const float* q, const float* k, const float* v, const bool* mask, float* out, int64_t groups,
            int64_t width, int64_t k_step, int64_t v_step, float scale, float* scores, const float* next_k,
            const float* next_v) {
  constexpr int64_t DIM = N * LANES;
  const int64_t padded = (width + LANES - 1) / LANES * LANES;
  constexpr int64_t BLOCK = 8;  // query heads whose sums stay in registers while the keys or values stream past
  for (int64_t g0 = 0; g0 < groups; g0 += BLOCK) {  // each key read once for the block's heads: independent sums
    const int64_t block = std::min(BLOCK, groups - g0);
    for (int64_t w = 0; w < width; ++w) {
      const float* key = k + w * k_step;
      if (g0 == 0) {  // once per column
        if (next_k != nullptr) prefetch<N>(next_k + w * k_step);
        prefetch<N>((next_v != nullptr ? next_v : v) + w * v_step);
      }
      Lanes keys[N];
      for (int j = 0; j < N; ++j) keys[j] = load(key + j * LANES);
      const bool attend = mask == nullptr || mask[w];
      for (int64_t g = 0; g < block; ++g) {
        const float* head = q + (g0 + g) * DIM;
        Lanes acc = load(head) * keys[0];
        for (int j = 1; j < N; ++j) acc += load(head + j * LANES) * keys[j];
        scores[(g0 + g) * padded + w] = attend ? total(acc) * scale : NEG_INF;
      }
    }
  }
  for (int64_t g = 0; g < groups; ++g) softmax(scores + g * padded, width);
  for (int64_t g0 = 0; g0 < groups; g0 += BLOCK) {
    const int64_t block = std::min(BLOCK, groups - g0);
    Lanes acc[BLOCK][N] = {};
    for (int64_t w = 0; w < width; ++w) {
      Lanes value[N];
      for (int j = 0; j < N; ++j) value[j] = load(v + w * v_step + j * LANES);
      for (int64_t g = 0; g < block; ++g) {
        const float p = scores[(g0 + g) * padded + w];
        for (int j = 0; j < N; ++j) acc[g][j] += p * value[j];
      }
    }
    for (int64_t g = 0; g < block; ++g)
      for (int j = 0; j < N; ++j) store(out + (g0 + g) * DIM + j * LANES, acc[g][j]);
  }
}

using Attend = void (*)(const float*, const float*, const float*, const bool*, float*, int64_t, int64_t, int64_t,
                        int64_t, float, float*, const float*, const float*);

// Head dims 16 to 128 in steps of 16, and 256 (madapt.serve.native.HEAD_DIMS).
Attend for_dim(int64_t dim) {
  switch (dim) {
    case 16: return &attend<1>;
    case 32: return &attend<2>;
    case 48: return &attend<3>;
    case 64: return &attend<4>;
    case 80: return &attend<5>;
    case 96: return &attend<6>;
    case 112: return &attend<7>;
    case 128: return &attend<8>;
    case 256: return &attend<16>;
    default: return nullptr;
  }
}

// query [rows, heads, dim] contiguous; key, value [rows, kv heads, width, dim] (any strides but the last);
// mask [rows, width] bool contiguous (true: attend) or none. Returns [rows, heads, dim].
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 4 && value.dim() == 4, "decode_attention: query 3-D, key/value 4-D");
  TORCH_CHECK(query.scalar_type() == at::kFloat && key.scalar_type() == at::kFloat &&
                  value.scalar_type() == at::kFloat, "decode_attention: float32 only");
  TORCH_CHECK(query.is_contiguous() && key.stride(3) == 1 && value.stride(3) == 1,
              "decode_attention: contiguous query, keys and values contiguous in their last dimension");
  const int64_t rows = query.size(0), heads = query.size(1), dim = query.size(2);
  const int64_t kv_heads = key.size(1), width = key.size(2);
  TORCH_CHECK(key.sizes() == value.sizes() && key.size(0) == rows && key.size(3) == dim,
              "decode_attention: key and value must be [rows, kv heads, width, dim] like the query's");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "decode_attention: heads must be a multiple of kv heads");
  const Attend run = for_dim(dim);
  TORCH_CHECK(run != nullptr, "decode_attention: head dim ", dim, " not built");
  const bool* m = nullptr;
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->is_contiguous() && mask->dim() == 2 &&
                    mask->size(0) == rows && mask->size(1) == width,
                "decode_attention: mask must be [rows, width] bool, contiguous");
    m = mask->data_ptr<bool>();
  }
  const int64_t groups = heads / kv_heads;
  at::Tensor out = at::empty({rows, heads, dim}, query.options());
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const auto ks = key.strides(), vs = value.strides();
  const float s = static_cast<float>(scale);
  at::parallel_for(0, rows * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * ((width + LANES - 1) / LANES * LANES));
    // task i's keys or values: row i / kv_heads, head i % kv_heads (null past the last task)
    const auto task = [&](const float* base, at::IntArrayRef strides, int64_t i) -> const float* {
      return i < end ? base + i / kv_heads * strides[0] + i % kv_heads * strides[1] : nullptr;
    };
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      const int64_t first = (r * heads + h * groups) * dim;
      run(q + first, task(k, ks, i), task(v, vs, i), m == nullptr ? nullptr : m + r * width, o + first, groups,
          width, ks[2], vs[2], s, scores.data(), task(k, ks, i + 1), task(v, vs, i + 1));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(madapt_cpu, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(madapt_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
