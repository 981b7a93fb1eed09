// The spatial moments a step-size controller reads from one Euler step, as an XLA FFI handler:
// for NHWC float32 tensors y (the state) and z, with the field f = scale * z + shift (scale and
// shift per example and channel: a post-activation field's last BatchNorm, folded into the step,
// or 1 and 0), per example and channel the means over the pixels of y, |y|, and of u = z - z_0
// (z_0 the example's first pixel, a pivot that keeps the variance free of the mean's
// cancellation), u^2, sign(f) (+1 at 0) and sign(f) u, in one pass over y and z, f never written
// out. Those six give the means of f, |f|, the variances of f and z and the gradient of StepNet's
// features into scale and shift (stepjax/kernels/moments.py derives them).
//
// Built into the same library as onednn_conv.cc (`python -m stepjax.kernels.build`).

#include <omp.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMoments = 6;  // y, |y|, u, u^2, sign(f), sign(f) u

// On x86-64 one clone of the summing loop per instruction set, chosen when the library loads.
#if defined(__x86_64__)
#define STEPJAX_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define STEPJAX_CLONES
#endif

// Sums of one example's pixels (h rows of w pixels of c channels) into acc[kMoments][c]: each row
// summed in float (the loop over the channels vectorises, 8 or 16 lanes), the row sums added in
// double, so that no float sum runs over more than one row. Summing everything in double took
// twice the time on data in the cache (deep protocol, stage 1: 0.78 ms against 0.40 ms on one
// core, docs/BENCHMARKS.md "StepNet's spatial moments in one pass").
STEPJAX_CLONES
void SumExample(const float* y, const float* z, const float* scale, const float* shift, int64_t h, int64_t w,
                int64_t c, double* acc, float* row, float* at_pivot) {
  for (int64_t k = 0; k < kMoments * c; ++k) acc[k] = 0.0;
  for (int64_t k = 0; k < c; ++k) at_pivot[k] = scale[k] * z[k] + shift[k];  // f = scale u + f(z_0)
  for (int64_t r = 0; r < h; ++r) {
    float* sy = row;
    float* ay = row + c;
    float* su = row + 2 * c;
    float* qu = row + 3 * c;
    float* gf = row + 4 * c;
    float* gu = row + 5 * c;
    for (int64_t k = 0; k < kMoments * c; ++k) row[k] = 0.0f;
    for (int64_t p = r * w; p < (r + 1) * w; ++p) {
      const float* zp = z + p * c;
      const float* yp = y + p * c;
#pragma GCC ivdep
      for (int64_t k = 0; k < c; ++k) {
        const float u = zp[k] - z[k], v = yp[k];
        const bool positive = scale[k] * u + at_pivot[k] >= 0.0f;
        sy[k] += v;
        ay[k] += std::fabs(v);
        su[k] += u;
        qu[k] += u * u;
        gf[k] += positive ? 1.0f : -1.0f;
        gu[k] += positive ? u : -u;
      }
    }
    for (int64_t k = 0; k < kMoments * c; ++k) acc[k] += row[k];
  }
}

ffi::Error MomentsImpl(ffi::Buffer<ffi::F32> y, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> scale,
                       ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> mean_y,
                       ffi::ResultBuffer<ffi::F32> mean_abs_y, ffi::ResultBuffer<ffi::F32> mean_u,
                       ffi::ResultBuffer<ffi::F32> mean_sq_u, ffi::ResultBuffer<ffi::F32> mean_sign_f,
                       ffi::ResultBuffer<ffi::F32> mean_sign_f_u, int64_t threads) {
  auto yd = y.dimensions(), zd = z.dimensions();
  if (yd.size() != 4 || zd.size() != 4) return ffi::Error::InvalidArgument("spatial_moments: rank-4 NHWC operands only");
  for (int i = 0; i < 4; ++i) {
    if (yd[i] != zd[i]) return ffi::Error::InvalidArgument("spatial_moments: y and z differ in shape");
  }
  const int64_t n = yd[0], h = yd[1], w = yd[2], hw = h * w, c = yd[3];
  if (hw == 0) return ffi::Error::InvalidArgument("spatial_moments: no pixels (the pivot is the first)");
  for (auto d : {scale.dimensions(), shift.dimensions()}) {
    if (d.size() != 2 || d[0] != n || d[1] != c) return ffi::Error::InvalidArgument("spatial_moments: scale and shift are (N, C)");
  }
  float* out[kMoments] = {mean_y->typed_data(),  mean_abs_y->typed_data(),  mean_u->typed_data(),
                          mean_sq_u->typed_data(), mean_sign_f->typed_data(), mean_sign_f_u->typed_data()};
  for (auto* result : {&mean_y, &mean_abs_y, &mean_u, &mean_sq_u, &mean_sign_f, &mean_sign_f_u}) {
    auto d = (*result)->dimensions();
    if (d.size() != 2 || d[0] != n || d[1] != c) return ffi::Error::InvalidArgument("spatial_moments: results are (N, C)");
  }
  const double per_pixel = 1.0 / static_cast<double>(hw);
  const float* yp = y.typed_data();
  const float* zp = z.typed_data();
  const float* sp = scale.typed_data();
  const float* tp = shift.typed_data();
#pragma omp parallel num_threads(static_cast<int>(threads > 0 ? threads : 1))
  {
    std::vector<double> acc(kMoments * c);
    std::vector<float> row(kMoments * c), at_pivot(c);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      SumExample(yp + b * hw * c, zp + b * hw * c, sp + b * c, tp + b * c, h, w, c, acc.data(), row.data(),
                 at_pivot.data());
      for (int m = 0; m < kMoments; ++m) {
        for (int64_t k = 0; k < c; ++k) out[m][b * c + k] = static_cast<float>(acc[m * c + k] * per_pixel);
      }
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StepjaxSpatialMoments, MomentsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

// The interface of this library's handlers, checked by stepjax.kernels.onednn.load: a library built
// from older sources (the five moments without scale and shift before 2, nine moments of f and z
// before 4) is not registered.
extern "C" int StepjaxAbiVersion() { return 4; }
