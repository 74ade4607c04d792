// Llama's rotary embedding on a forward's new queries and keys, with the keys and values written straight
// into the KV cache's room, in one pass.
//
// transformers' form is two `apply_rotary_pos_emb` halves (multiply, slice, negate, concatenate, multiply,
// add, for queries and keys) and the cache's own copies of keys and values: ~15 tensor ops a layer, each a
// dispatch and a trip through memory, on a decode step's few rows. Here each (row, token) is rotated and
// stored once. The maths is transformers' to the bit: out = x * cos + rotate_half(x) * sin, every product
// rounded before the sum (no fused multiply-add, `fp-contract=off`), rotate_half(x) = (-x2, x1).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>

namespace {

// One head's `dim` floats: x * cos + rotate_half(x) * sin, each product rounded on its own.
__attribute__((optimize("fp-contract=off"))) void rotate(const float* x, const float* cos, const float* sin,
                                                         float* out, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float kept = x[i] * cos[i];
    const float turned = -x[i + half] * sin[i];
    out[i] = kept + turned;
  }
  for (int64_t i = half; i < dim; ++i) {
    const float kept = x[i] * cos[i];
    const float turned = x[i - half] * sin[i];
    out[i] = kept + turned;
  }
}

void check_projection(const at::Tensor& t, const char* name, int64_t rows, int64_t tokens) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == rows && t.size(1) == tokens &&
                  t.stride(2) == 1,
              "rotary_cache: ", name, " must be float32 [rows, tokens, features], contiguous in its last dimension");
}

// query [rows, tokens, heads * dim], key and value [rows, tokens, kv_heads * dim] (each contiguous in its last
// dimension, any row and token strides: columns of a fused projection); cos, sin [rows, tokens, dim];
// key_cache, value_cache [capacity rows >= rows, kv_heads, capacity columns, dim], contiguous. Writes the
// rotated keys and the values into columns start .. start + tokens of the caches' first rows; returns the
// rotated queries [rows, heads, tokens, dim].
at::Tensor rotary_cache(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& key_cache, const at::Tensor& value_cache,
                        int64_t start) {
  const int64_t rows = query.size(0), tokens = query.size(1);
  check_projection(query, "query", rows, tokens);
  check_projection(key, "key", rows, tokens);
  check_projection(value, "value", rows, tokens);
  TORCH_CHECK(key_cache.scalar_type() == at::kFloat && value_cache.scalar_type() == at::kFloat &&
                  key_cache.dim() == 4 && key_cache.sizes() == value_cache.sizes() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous(),
              "rotary_cache: key_cache and value_cache must be contiguous float32 [rows, kv heads, columns, dim]");
  const int64_t kv_heads = key_cache.size(1), columns = key_cache.size(2), dim = key_cache.size(3);
  TORCH_CHECK(dim % 2 == 0 && query.size(2) % dim == 0 && key.size(2) == kv_heads * dim &&
                  value.size(2) == kv_heads * dim,
              "rotary_cache: projections' widths do not match the cache's heads and dim");
  TORCH_CHECK(key_cache.size(0) >= rows && start >= 0 && start + tokens <= columns,
              "rotary_cache: no room in the cache for ", rows, " rows x ", tokens, " columns at column ", start);
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == sin.sizes() && cos.numel() == rows * tokens * dim,
              "rotary_cache: cos and sin must be contiguous float32 [rows, tokens, dim]");
  const int64_t heads = query.size(2) / dim;
  at::Tensor out = at::empty({rows, heads, tokens, dim}, query.options());
  const float* q = query.data_ptr<float>();
  const float* k = key.data_ptr<float>();
  const float* v = value.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  float* kc = key_cache.data_ptr<float>();
  float* vc = value_cache.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, rows * tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / tokens, t = i % tokens;
      const float* cr = c + i * dim;
      const float* sr = s + i * dim;
      const float* qr = q + r * query.stride(0) + t * query.stride(1);
      for (int64_t h = 0; h < heads; ++h) rotate(qr + h * dim, cr, sr, o + ((r * heads + h) * tokens + t) * dim, dim);
      const float* kr = k + r * key.stride(0) + t * key.stride(1);
      const float* vr = v + r * value.stride(0) + t * value.stride(1);
      for (int64_t h = 0; h < kv_heads; ++h) {
        const int64_t at = ((r * kv_heads + h) * columns + start + t) * dim;
        rotate(kr + h * dim, cr, sr, kc + at, dim);
        std::copy(vr + h * dim, vr + (h + 1) * dim, vc + at);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(madapt_cpu, m) {
  m.def(
      "rotary_cache(Tensor query, Tensor key, Tensor value, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, int start) -> Tensor");
}

TORCH_LIBRARY_IMPL(madapt_cpu, CPU, m) { m.impl("rotary_cache", &rotary_cache); }
