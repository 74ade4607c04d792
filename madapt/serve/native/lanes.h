// 16 floats as one vector (GCC/Clang vector extensions): one AVX-512 register where the build has it
// (-march=native), split by the compiler where it does not. What madapt's CPU kernels share.
#pragma once

#include <cstdint>
#include <cstring>

namespace madapt {

typedef float Lanes __attribute__((vector_size(64)));
typedef float HalfLanes __attribute__((vector_size(32)));
typedef float QuarterLanes __attribute__((vector_size(16)));
typedef int IntLanes __attribute__((vector_size(64)));
constexpr int64_t LANES = 16;

inline Lanes load(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// The sum of the lanes as a fixed tree (halves, quarters, four scalars): the same order for every row.
inline float total(Lanes x) {
  HalfLanes lo, hi;
  std::memcpy(&lo, &x, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof lo, sizeof hi);
  const HalfLanes h = lo + hi;
  QuarterLanes a, b;
  std::memcpy(&a, &h, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&h) + sizeof a, sizeof b);
  const QuarterLanes q = a + b;
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// e^x lane by lane (Cephes' expf: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], ~1 ulp). Lanes
// below -87.3 (under float's normal range, -inf among them) give exactly 0; above 88.3, e^88.3.
inline Lanes exp_lanes(Lanes x) {
  const auto underflow = x < -87.3f;
  x = underflow ? Lanes{} - 87.3f : x;
  x = x > 88.3f ? Lanes{} + 88.3f : x;
  const Lanes magic = Lanes{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Lanes n = (x * 1.44269504088896341f + magic) - magic;
  const Lanes r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  Lanes p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const IntLanes bits = (__builtin_convertvector(n, IntLanes) + 127) << 23;
  Lanes two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof two_to_n);
  return underflow ? Lanes{} : p * two_to_n;
}

}  // namespace madapt
