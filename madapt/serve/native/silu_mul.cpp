// A gated MLP's activation, silu(gate) * up, in one pass over the two halves.
//
// transformers runs it as two ops (SiLU, then a multiply), each a dispatch and a new tensor; with gate and
// up as the two halves of one fused GEMM's output (madapt.serve.cpu_gemm) they are strided views, read
// here in place. silu(g) = g / (1 + e^-g), then times up, in torch's order; e^x is madapt's vector exp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>

#include "lanes.h"

namespace {

using madapt::exp_lanes;
using madapt::Lanes;
using madapt::LANES;
using madapt::load;
using madapt::store;

// gate, up [rows, features] (contiguous in their last dimension, any row stride); returns [rows, features].
at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.scalar_type() == at::kFloat && up.scalar_type() == at::kFloat, "silu_mul: float32 only");
  TORCH_CHECK(gate.dim() == 2 && gate.sizes() == up.sizes() && gate.stride(1) == 1 && up.stride(1) == 1,
              "silu_mul: gate and up [rows, features], contiguous in their last dimension");
  const int64_t rows = gate.size(0), features = gate.size(1);
  at::Tensor out = at::empty({rows, features}, gate.options());
  const float* g = gate.data_ptr<float>();
  const float* u = up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t g_step = gate.stride(0), u_step = up.stride(0);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gr = g + r * g_step;
      const float* ur = u + r * u_step;
      float* out_row = o + r * features;
      int64_t i = 0;
      for (; i + LANES <= features; i += LANES) {
        const Lanes x = load(gr + i);
        store(out_row + i, x / (1.0f + exp_lanes(-x)) * load(ur + i));
      }
      for (; i < features; ++i) out_row[i] = gr[i] / (1.0f + std::exp(-gr[i])) * ur[i];
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(madapt_cpu, m) { m.def("silu_mul(Tensor gate, Tensor up) -> Tensor"); }

TORCH_LIBRARY_IMPL(madapt_cpu, CPU, m) { m.impl("silu_mul", &silu_mul); }
