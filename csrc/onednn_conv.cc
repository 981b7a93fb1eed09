// The convolutions of `stepjax.models.layers.conv2d` as XLA FFI handlers that call oneDNN:
// forward, input gradient and kernel gradient of a bias-free NHWC/HWIO fp32 convolution with
// padding k // 2 on both sides (odd k, any stride); 1x1 convolutions with stride 1 as matrix
// products (sgemm). Python side: stepjax/kernels/onednn.py.
//
// Built against oneDNN 3.2 (PyPI onednn-cpu-gomp + onednn-devel-cpu-gomp 2023.2.0, GNU OpenMP)
// and jax's XLA FFI headers (jax.ffi.include_dir()): `python -m stepjax.kernels.build`.

#include <omp.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

enum Kind : int64_t { kForward, kInputGrad, kKernelGrad };

// One convolution: batch n, input h x w x c, output channels o, kernel k x k, stride s.
struct Geometry {
  int64_t n, h, w, c, o, k, s;
  int64_t pad() const { return k / 2; }
  int64_t ho() const { return (h + 2 * pad() - k) / s + 1; }
  int64_t wo() const { return (w + 2 * pad() - k) / s + 1; }
  std::array<int64_t, 7> key() const { return {n, h, w, c, o, k, s}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A primitive for one (kind, geometry), with the layout of its kernel (or kernel gradient):
// oneDNN picks a blocked layout for it; activations stay in the caller's NHWC buffers.
struct Plan {
  dnnl::primitive conv;
  memory::desc kernel;       // the layout the primitive wants
  memory::desc user_kernel;  // HWIO, the caller's
  memory::desc scratchpad;   // the caller provides it: the same primitive may run on two threads
  dnnl::primitive to_kernel, from_kernel;  // reorders between the two (when they differ)

  template <typename PrimitiveDesc>
  Plan(const PrimitiveDesc& pd, memory::desc kernel, memory::desc user)
      : conv(pd), kernel(kernel), user_kernel(user), scratchpad(pd.scratchpad_desc()) {
    if (blocked()) {
      to_kernel = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user, Engine(), kernel));
      from_kernel = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), kernel, Engine(), user));
    }
  }
  bool blocked() const { return kernel != user_kernel; }
};

Plan MakePlan(Kind kind, const Geometry& g) {
  const auto f32 = memory::data_type::f32;
  memory::desc x({g.n, g.c, g.h, g.w}, f32, tag::nhwc);
  memory::desc y({g.n, g.o, g.ho(), g.wo()}, f32, tag::nhwc);
  memory::desc any_kernel({g.o, g.c, g.k, g.k}, f32, tag::any);
  memory::desc hwio({g.o, g.c, g.k, g.k}, f32, tag::hwio);
  memory::dims strides{g.s, g.s}, pad{g.pad(), g.pad()};
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::convolution_forward::primitive_desc fwd(Engine(), dnnl::prop_kind::forward_training, algo, x,
                                                any_kernel, y, strides, pad, pad, attr);
  if (kind == kForward) return Plan(fwd, fwd.weights_desc(), hwio);
  if (kind == kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(Engine(), algo, x, any_kernel, y, strides, pad,
                                                       pad, fwd, attr);
    return Plan(pd, pd.weights_desc(), hwio);
  }
  dnnl::convolution_backward_weights::primitive_desc pd(Engine(), algo, x, any_kernel, y, strides,
                                                        pad, pad, fwd, attr);
  return Plan(pd, pd.diff_weights_desc(), hwio);
}

// Plans are built once per (kind, geometry) and shared by all threads (oneDNN primitives are
// stateless and may run concurrently: XLA runs one stream per CPU device).
const Plan& GetPlan(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::array<int64_t, 8>, std::unique_ptr<Plan>> plans;
  auto shape = g.key();
  std::array<int64_t, 8> key{kind, shape[0], shape[1], shape[2], shape[3], shape[4], shape[5], shape[6]};
  std::lock_guard<std::mutex> lock(mutex);
  auto& plan = plans[key];
  if (!plan) plan = std::make_unique<Plan>(MakePlan(kind, g));
  return *plan;
}

// A 1x1 convolution with stride 1 is a matrix product over the pixels: x (pixels x c) times the
// HWIO kernel read as a c x o matrix. oneDNN's sgemm (row-major) runs all three products at its
// matrix rate; its 1x1 convolution ran the kernel gradient 3-4x slower when the activations were
// 64-byte aligned, as XLA's are (docs/BENCHMARKS.md, sitting 23).
void RunProduct(Kind kind, const Geometry& g, float* act, float* grad, float* kernel) {
  const int64_t m = g.n * g.h * g.w, c = g.c, o = g.o;
  dnnl::status status;
  if (kind == kForward) {  // y = x w
    status = dnnl::sgemm('N', 'N', m, o, c, 1.f, act, c, kernel, o, 0.f, grad, o);
  } else if (kind == kInputGrad) {  // dx = dy w^T
    status = dnnl::sgemm('N', 'T', m, c, o, 1.f, grad, o, kernel, o, 0.f, act, c);
  } else {  // dw = x^T dy
    status = dnnl::sgemm('T', 'N', c, o, m, 1.f, act, c, grad, o, 0.f, kernel, o);
  }
  if (status != dnnl::status::success) throw dnnl::error(static_cast<dnnl_status_t>(status), "sgemm");
}

// Runs `kind` on the caller's buffers: `act` is x (forward, kernel gradient) or dx (input
// gradient), `grad` is y or dy, `kernel` is w or dw (HWIO).
void Run(Kind kind, const Geometry& g, float* act, float* grad, float* kernel, int64_t threads) {
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  if (g.k == 1 && g.s == 1) return RunProduct(kind, g, act, grad, kernel);
  const Plan& plan = GetPlan(kind, g);
  const auto f32 = memory::data_type::f32;
  dnnl::stream stream(Engine());
  memory x(memory::desc({g.n, g.c, g.h, g.w}, f32, tag::nhwc), Engine(), act);
  memory y(memory::desc({g.n, g.o, g.ho(), g.wo()}, f32, tag::nhwc), Engine(), grad);
  memory user(plan.user_kernel, Engine(), kernel);
  memory k = plan.blocked() ? memory(plan.kernel, Engine()) : user;
  memory scratch(plan.scratchpad, Engine());
  auto reorder = [&](const dnnl::primitive& r, memory& from, memory& to) {
    if (plan.blocked()) r.execute(stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}});
  };
  if (kind == kForward) {
    reorder(plan.to_kernel, user, k);
    plan.conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DST, y}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else if (kind == kInputGrad) {
    reorder(plan.to_kernel, user, k);
    plan.conv.execute(stream, {{DNNL_ARG_DIFF_DST, y}, {DNNL_ARG_WEIGHTS, k}, {DNNL_ARG_DIFF_SRC, x}, {DNNL_ARG_SCRATCHPAD, scratch}});
  } else {
    plan.conv.execute(stream, {{DNNL_ARG_SRC, x}, {DNNL_ARG_DIFF_DST, y}, {DNNL_ARG_DIFF_WEIGHTS, k}, {DNNL_ARG_SCRATCHPAD, scratch}});
    reorder(plan.from_kernel, k, user);
  }
  stream.wait();
}

ffi::Error Check(const Geometry& g, ffi::AnyBuffer::Dimensions out) {
  if (out.size() == 4 && out[0] == g.n && out[1] == g.ho() && out[2] == g.wo() && out[3] == g.o) {
    return ffi::Error::Success();
  }
  return ffi::Error::InvalidArgument("onednn_conv: output gradient shape does not match the convolution");
}

template <typename F>
ffi::Error Guard(F&& body) {
  try {
    return body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

ffi::Error ForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
                       int64_t stride, int64_t threads) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4) return ffi::Error::InvalidArgument("onednn_conv: rank-4 operands only");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], stride};
  if (auto err = Check(g, y->dimensions()); err.failure()) return err;
  return Guard([&] {
    Run(kForward, g, x.typed_data(), y->typed_data(), w.typed_data(), threads);
    return ffi::Error::Success();
  });
}

ffi::Error InputGradImpl(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> dx,
                         int64_t stride, int64_t threads) {
  auto xd = dx->dimensions(), wd = w.dimensions();
  if (xd.size() != 4 || wd.size() != 4) return ffi::Error::InvalidArgument("onednn_conv: rank-4 operands only");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], stride};
  if (auto err = Check(g, dy.dimensions()); err.failure()) return err;
  return Guard([&] {
    Run(kInputGrad, g, dx->typed_data(), dy.typed_data(), w.typed_data(), threads);
    return ffi::Error::Success();
  });
}

ffi::Error KernelGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw,
                          int64_t stride, int64_t threads) {
  auto xd = x.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || wd.size() != 4) return ffi::Error::InvalidArgument("onednn_conv: rank-4 operands only");
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[3], wd[0], stride};
  if (auto err = Check(g, dy.dimensions()); err.failure()) return err;
  return Guard([&] {
    Run(kKernelGrad, g, x.typed_data(), dy.typed_data(), dw->typed_data(), threads);
    return ffi::Error::Success();
  });
}

}  // namespace

// All three take two fp32 operands, return one, and read the stride and the OpenMP threads.
namespace {
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("threads");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(StepjaxConvForward, ForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StepjaxConvInputGrad, InputGradImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(StepjaxConvKernelGrad, KernelGradImpl, Binding());
