// 3D convolutions and transposed convolutions on CPU with oneDNN, as XLA
// FFI handlers.
//
// Built and loaded by tversky_jax/models/onednn_conv.py (which documents the
// build); called from JAX with jax.ffi.ffi_call. Three handlers, all float32,
// channels-last, with strides and zero padding (lo, hi) per spatial axis:
//
//   TjConv3dForward:        x [n, x, y, z, ci], k [kx, ky, kz, ci, co] -> out [n, ox, oy, oz, co]
//   TjConv3dBackwardData:   d_out, k -> d_x   (the gradient of the input)
//   TjConv3dBackwardKernel: x, d_out -> d_k   (the gradient of the kernel)
//
// With the attribute transposed=true they run oneDNN's deconvolution (the
// transposed convolution, dst[s * v + i] += x[v] @ k[i]) instead.
//
// Activations stay in their channels-last layout (oneDNN's "ndhwc"); only the
// kernel, which is small, is reordered to the layout the primitive prefers.
// Primitives are created once per geometry and kept; executing one from
// several threads at once is safe because each call brings its own
// scratchpad (scratchpad_mode::user).

#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = dnnl::memory::format_tag;

namespace {

enum Kind { kForward = 0, kBackwardData = 1, kBackwardKernel = 2 };

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// The shapes of one convolution, in JAX's order (see the file comment).
struct Geometry {
  std::vector<int64_t> x, k, out, lo, hi, strides;
  bool transposed;
  bool operator<(const Geometry& o) const {
    return std::tie(x, k, out, lo, hi, strides, transposed) <
           std::tie(o.x, o.k, o.out, o.lo, o.hi, o.strides, o.transposed);
  }
};

// oneDNN's logical orders are (n, c, spatial...) and (co, ci, spatial...).
memory::desc Activation(const std::vector<int64_t>& s) {
  return memory::desc({s[0], s[4], s[1], s[2], s[3]}, memory::data_type::f32, Tag::ndhwc);
}
memory::desc Kernel(const std::vector<int64_t>& s, Tag tag) {
  return memory::desc({s[4], s[3], s[0], s[1], s[2]}, memory::data_type::f32, tag);
}

// A created primitive with what executing it needs.
struct Entry {
  dnnl::primitive primitive;
  memory::desc kernel;  // the (gradient of the) kernel in the primitive's layout
  memory::desc scratchpad;
  bool reorder = false;  // kernel layout differs from JAX's
  dnnl::reorder to_primitive, from_primitive;
};

// The three primitives of a convolution (Op = dnnl::convolution_*) or of a
// transposed convolution (dnnl::deconvolution_*): same arguments.
template <typename Forward, typename BackwardData, typename BackwardWeights>
Entry CreateOf(Kind kind, const Geometry& g, dnnl::algorithm algorithm) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const memory::desc x = Activation(g.x), out = Activation(g.out);
  const memory::desc any = Kernel(g.k, Tag::any);
  auto forward = typename Forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, algorithm, x, any, out,
      g.strides, g.lo, g.hi, attr);
  if (kind == kForward) {
    return {Forward(forward), forward.weights_desc(), forward.scratchpad_desc()};
  }
  if (kind == kBackwardData) {
    auto pd = typename BackwardData::primitive_desc(
        Engine(), algorithm, x, any, out, g.strides, g.lo, g.hi, forward, attr);
    return {BackwardData(pd), pd.weights_desc(), pd.scratchpad_desc()};
  }
  auto pd = typename BackwardWeights::primitive_desc(
      Engine(), algorithm, x, any, out, g.strides, g.lo, g.hi, forward, attr);
  return {BackwardWeights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
}

Entry Create(Kind kind, const Geometry& g) {
  Entry e = g.transposed
      ? CreateOf<dnnl::deconvolution_forward, dnnl::deconvolution_backward_data,
                 dnnl::deconvolution_backward_weights>(
            kind, g, dnnl::algorithm::deconvolution_direct)
      : CreateOf<dnnl::convolution_forward, dnnl::convolution_backward_data,
                 dnnl::convolution_backward_weights>(
            kind, g, dnnl::algorithm::convolution_direct);
  const memory::desc user = Kernel(g.k, Tag::dhwio);
  e.reorder = e.kernel != user;
  if (e.reorder) {
    e.to_primitive = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), user, Engine(), e.kernel));
    e.from_primitive = dnnl::reorder(dnnl::reorder::primitive_desc(Engine(), e.kernel, Engine(), user));
  }
  return e;
}

const Entry& Cached(Kind kind, const Geometry& g) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::pair<int, Geometry>, std::unique_ptr<Entry>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = (*cache)[{kind, g}];
  if (!slot) slot = std::make_unique<Entry>(Create(kind, g));
  return *slot;
}

// Runs one convolution. x, k and out point at JAX's buffers; which of them
// is written depends on `kind` (out, x or k, in that order).
void Execute(Kind kind, const Geometry& g, void* x, void* k, void* out) {
  const Entry& e = Cached(kind, g);
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  thread_local std::vector<uint8_t> scratch, kernel;
  scratch.resize(e.scratchpad.get_size());
  kernel.resize(e.reorder ? e.kernel.get_size() : 0);
  memory xm(Activation(g.x), engine, x), outm(Activation(g.out), engine, out);
  memory user(Kernel(g.k, Tag::dhwio), engine, k);
  memory km = e.reorder ? memory(e.kernel, engine, kernel.data()) : user;
  memory sm(e.scratchpad, engine, scratch.data());
  if (kind != kBackwardKernel && e.reorder) {
    e.to_primitive.execute(stream, user, km);
  }
  if (kind == kForward) {
    e.primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_WEIGHTS, km},
                                 {DNNL_ARG_DST, outm}, {DNNL_ARG_SCRATCHPAD, sm}});
  } else if (kind == kBackwardData) {
    e.primitive.execute(stream, {{DNNL_ARG_DIFF_SRC, xm}, {DNNL_ARG_WEIGHTS, km},
                                 {DNNL_ARG_DIFF_DST, outm}, {DNNL_ARG_SCRATCHPAD, sm}});
  } else {
    e.primitive.execute(stream, {{DNNL_ARG_SRC, xm}, {DNNL_ARG_DIFF_WEIGHTS, km},
                                 {DNNL_ARG_DIFF_DST, outm}, {DNNL_ARG_SCRATCHPAD, sm}});
    if (e.reorder) e.from_primitive.execute(stream, km, user);
  }
  stream.wait();
}

std::vector<int64_t> Dims(ffi::AnyBuffer::Dimensions d) { return {d.begin(), d.end()}; }
std::vector<int64_t> Vec(ffi::Span<const int64_t> s) { return {s.begin(), s.end()}; }

ffi::Error Run(Kind kind, Geometry g, void* x, void* k, void* out) {
  for (const auto* s : {&g.x, &g.k, &g.out}) {
    if (s->size() != 5) {
      return ffi::Error::InvalidArgument("oneDNN conv3d: expected rank-5 arrays");
    }
  }
  if (g.lo.size() != 3 || g.hi.size() != 3 || g.strides.size() != 3) {
    return ffi::Error::InvalidArgument(
        "oneDNN conv3d: expected 3 paddings per side and 3 strides");
  }
  try {
    Execute(kind, g, x, k, out);
  } catch (const std::exception& error) {  // dnnl::error, std::bad_alloc
    return ffi::Error::Internal(std::string("oneDNN conv3d: ") + error.what());
  }
  return ffi::Error::Success();
}

using Span = ffi::Span<const int64_t>;

Geometry Make(ffi::AnyBuffer::Dimensions x, ffi::AnyBuffer::Dimensions k,
              ffi::AnyBuffer::Dimensions out, Span lo, Span hi, Span strides,
              bool transposed) {
  return {Dims(x), Dims(k), Dims(out), Vec(lo), Vec(hi), Vec(strides), transposed};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   Span lo, Span hi, Span strides, bool transposed,
                   ffi::ResultBuffer<ffi::F32> out) {
  return Run(kForward, Make(x.dimensions(), k.dimensions(), out->dimensions(), lo, hi,
                             strides, transposed),
             x.untyped_data(), k.untyped_data(), out->untyped_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> d_out, ffi::Buffer<ffi::F32> k,
                        Span lo, Span hi, Span strides, bool transposed,
                        ffi::ResultBuffer<ffi::F32> d_x) {
  return Run(kBackwardData,
             Make(d_x->dimensions(), k.dimensions(), d_out.dimensions(), lo, hi,
                  strides, transposed),
             d_x->untyped_data(), k.untyped_data(), d_out.untyped_data());
}

ffi::Error BackwardKernel(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> d_out,
                          Span lo, Span hi, Span strides, bool transposed,
                          ffi::ResultBuffer<ffi::F32> d_k) {
  return Run(kBackwardKernel,
             Make(x.dimensions(), d_k->dimensions(), d_out.dimensions(), lo, hi,
                  strides, transposed),
             x.untyped_data(), d_k->untyped_data(), d_out.untyped_data());
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Attr<Span>("padding_lo")
      .Attr<Span>("padding_hi")
      .Attr<Span>("strides")
      .Attr<bool>("transposed")
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(TjConv3dForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TjConv3dBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(TjConv3dBackwardKernel, BackwardKernel, Binding());
