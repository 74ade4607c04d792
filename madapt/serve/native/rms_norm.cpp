// RMSNorm as Llama and its kin compute it, weight * (x * rsqrt(mean(x^2) + eps)), one pass per row.
//
// transformers' form is six tensor ops (pow, mean, add, rsqrt, two multiplies), each a dispatch and a trip
// through memory; at a decode step (32 rows of a few hundred features) their overhead is most of the cost.
// Here a row's squares are summed in vector lanes (a fixed tree at the end, the same order for every row),
// and the two multiplies are the model's, in its order: the result differs from transformers' only in the
// rounding of the sum.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>

#include "lanes.h"

namespace {

using madapt::Lanes;
using madapt::LANES;
using madapt::load;
using madapt::store;

void normalise(const float* x, const float* weight, float* out, int64_t features, float eps) {
  Lanes squares = {};
  int64_t i = 0;
  for (; i + LANES <= features; i += LANES) {
    const Lanes v = load(x + i);
    squares += v * v;
  }
  float sum = 0;
  for (int64_t l = 0; l < LANES; l += 2) sum += squares[l] + squares[l + 1];
  for (; i < features; ++i) sum += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(features) + eps);
  i = 0;
  for (; i + LANES <= features; i += LANES) store(out + i, load(weight + i) * (load(x + i) * scale));
  for (; i < features; ++i) out[i] = weight[i] * (x[i] * scale);
}

// x [..., features] (rows contiguous), weight [features]; returns weight * (x * rsqrt(mean(x^2) + eps)).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "rms_norm: float32 only");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.dim() >= 1 &&
                  x.size(-1) == weight.size(0), "rms_norm: contiguous x [..., features] and weight [features]");
  const int64_t features = weight.size(0), rows = features == 0 ? 0 : x.numel() / features;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xs = x.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) normalise(xs + r * features, w, os + r * features, features, e);
  });
  return out;
}

// The residual stream's add and the next norm in one pass: sum = x + delta (an add rounded as torch's), then
// the norm of each row of the sum as `rms_norm` computes it. x, delta [rows, features] contiguous.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat, "add_rms_norm: float32 only");
  TORCH_CHECK(x.is_contiguous() && delta.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 &&
                  x.dim() == 2 && x.sizes() == delta.sizes() && x.size(1) == weight.size(0),
              "add_rms_norm: contiguous x and delta [rows, features], weight [features]");
  const int64_t rows = x.size(0), features = x.size(1);
  at::Tensor sum = at::empty(x.sizes(), x.options());
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float* xs = x.data_ptr<float>();
  const float* ds = delta.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* ss = sum.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* a = xs + r * features;
      const float* b = ds + r * features;
      float* row = ss + r * features;
      int64_t i = 0;
      for (; i + LANES <= features; i += LANES) store(row + i, load(a + i) + load(b + i));
      for (; i < features; ++i) row[i] = a[i] + b[i];
      normalise(row, w, os + r * features, features, e);
    }
  });
  return {sum, out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(madapt_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(madapt_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
}
