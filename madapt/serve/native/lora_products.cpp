// Each row's own LoRA product at a decode step: y[row] + (x[row] @ A[j]) @ B[j] for the rows of one rank
// class, one task per row (Punica's BGMV, the batched gather matrix-vector product, on CPU).
//
// torch's form (madapt.serve.multilora: a bmm for x @ A, a baddbmm for the rest, index_select/index_add for
// a class that holds only some of the rows) runs two or four batched kernels of 1 x in x r and 1 x r x out
// products; at a decode step those are memory-bound reads of every row's factors with a per-matrix
// overhead on top. Here each row's A and B stream through once, in vector loops over the rank and the
// output features. A row's result depends only on its own x, A, B and y, whichever rows share the call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "lanes.h"

namespace {

using madapt::Lanes;
using madapt::LANES;
using madapt::load;
using madapt::store;

// out_row += (x @ a) @ b for one row: a [in, RANK], b [RANK, out]. RANK > 0: the rank known when compiled (the
// down-projection's sums stay in registers); 0: `rank` at run time.
template <int64_t RANK>
void add_product(const float* x, const float* a, const float* b, float* out_row, int64_t in_features,
                 int64_t out_features, int64_t rank, float* scratch) {
  const int64_t r = RANK > 0 ? RANK : rank;
  float* t = scratch;
  if constexpr (RANK > 0 && RANK % LANES == 0) {
    Lanes sums[RANK / LANES] = {};
    for (int64_t i = 0; i < in_features; ++i) {
      const float xi = x[i];
      for (int64_t v = 0; v < RANK / LANES; ++v) sums[v] += xi * load(a + i * RANK + v * LANES);
    }
    for (int64_t v = 0; v < RANK / LANES; ++v) store(t + v * LANES, sums[v]);
  } else {
    std::fill(t, t + r, 0.0f);
    for (int64_t i = 0; i < in_features; ++i) {
      const float xi = x[i];
      for (int64_t k = 0; k < r; ++k) t[k] += xi * a[i * r + k];
    }
  }
  int64_t o = 0;
  for (; o + LANES <= out_features; o += LANES) {
    Lanes up = t[0] * load(b + o);
    for (int64_t k = 1; k < r; ++k) up += t[k] * load(b + k * out_features + o);
    store(out_row + o, load(out_row + o) + up);
  }
  for (; o < out_features; ++o) {
    float up = t[0] * b[o];
    for (int64_t k = 1; k < r; ++k) up += t[k] * b[k * out_features + o];
    out_row[o] += up;
  }
}

using AddProduct = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t, int64_t, float*);

AddProduct for_rank(int64_t rank) {
  switch (rank) {
    case 8: return &add_product<8>;
    case 16: return &add_product<16>;
    case 32: return &add_product<32>;
    case 64: return &add_product<64>;
    default: return &add_product<0>;
  }
}

// y [n, out] and x [n, in] (contiguous in their last dimension); a [m, in, r], b [m, r, out] contiguous;
// rows: m distinct int64 row numbers of y and x, or none (m == n, row j is j). Returns y with the products
// added to those rows, as a new contiguous tensor.
at::Tensor lora_products(const at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                         const c10::optional<at::Tensor>& rows) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 3 && b.dim() == 3, "lora_products: y, x 2-D, a, b 3-D");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                  b.scalar_type() == at::kFloat, "lora_products: float32 only");
  const int64_t n = y.size(0), out_features = y.size(1), in_features = x.size(1);
  const int64_t m = a.size(0), rank = a.size(2);
  TORCH_CHECK(x.size(0) == n && a.size(1) == in_features && b.size(0) == m && b.size(1) == rank &&
                  b.size(2) == out_features, "lora_products: shapes y [n, out], x [n, in], a [m, in, r], b [m, r, out]");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1 && a.is_contiguous() && b.is_contiguous(),
              "lora_products: y and x contiguous in their last dimension, a and b contiguous");
  const int64_t* picked = nullptr;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->size(0) == m && rows->is_contiguous(),
                "lora_products: rows must be m int64 row numbers");
    picked = rows->data_ptr<int64_t>();
    for (int64_t j = 0; j < m; ++j) TORCH_CHECK(picked[j] >= 0 && picked[j] < n, "lora_products: row out of range");
  } else {
    TORCH_CHECK(m == n, "lora_products: without rows, one factor pair per row");
  }
  at::Tensor out = at::empty({n, out_features}, y.options());
  out.copy_(y);
  const float* xs = x.data_ptr<float>();
  const float* as = a.data_ptr<float>();
  const float* bs = b.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const int64_t x_step = x.stride(0);
  const AddProduct add = for_rank(rank);
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(rank);
    for (int64_t j = begin; j < end; ++j) {
      const int64_t row = picked == nullptr ? j : picked[j];
      add(xs + row * x_step, as + j * in_features * rank, bs + j * rank * out_features, os + row * out_features,
          in_features, out_features, rank, scratch.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(madapt_cpu, m) {
  m.def("lora_products(Tensor y, Tensor x, Tensor a, Tensor b, Tensor? rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(madapt_cpu, CPU, m) { m.impl("lora_products", &lora_products); }
