// oneDNN 3D convolutions (forward, backward-data, backward-weights) as XLA FFI custom calls (CPU).
//
// Layouts are JAX's channels-last ones: input/output (N, D, H, W, C) and kernel (KD, KH, KW, I, O).
// Each handler takes the two operands of its convolution and writes the third; the attributes are the
// spatial strides, the explicit low/high paddings (already trimmed so that the output size is exact) and the
// kernel's dilation in oneDNN's convention (0 = none; lungct uses it only for weight gradients computed as a
// forward convolution, onednn_conv._weights_by_forward).
// Element types come from the buffers (f32, bf16 or f16), so the caller chooses e.g. f32 weight gradients
// from bf16 activations. Primitives are created once per shape and cached (`Plan`).
//
// Threads: XLA runs custom calls on its own worker threads (one or more per virtual device), so a cached
// primitive is created on one thread and executed on others. oneDNN's default ("library") scratchpad is a
// buffer per *creating* thread (built without DNNL_ENABLE_CONCURRENT_EXEC, as the onednn-cpu-gomp wheel is:
// "each primitive should be executed in the same thread it was created in", dnnl.hpp). A primitive executed
// on another thread wrote into that thread's scratchpad, sized for other primitives or not allocated at all:
// a SIGSEGV in gemm_convolution_bwd_weights_t on AVX2 (issue 16) and possibly silent corruption elsewhere.
// So every primitive uses a user scratchpad (`scratchpad_mode::user`): the buffer is passed at execution.
//
// `lungct_onednn_check` tries to create the three primitives of a convolution (at trace time, from Python),
// so a CPU without e.g. bf16 kernels gets XLA's convolution instead of an error at run time.
//
// Built on first use by lungct/ops/build.py (g++ -shared, headers from jax.ffi.include_dir() and the
// onednn devel package); every exception becomes an FFI error, never a crash.
#include <cstdint>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

enum Kind { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

dnnl::engine& Engine() {
  static dnnl::engine* eng = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *eng;
}

bool ToDnnl(ffi::DataType t, memory::data_type* out) {
  switch (t) {
    case ffi::DataType::F32: *out = memory::data_type::f32; return true;
    case ffi::DataType::BF16: *out = memory::data_type::bf16; return true;
    case ffi::DataType::F16: *out = memory::data_type::f16; return true;
    default: return false;
  }
}

// Layout policy for activations: 0 = plain channels-last (no reorders), 1 = let oneDNN choose (blocked
// layouts, reorders around the call). Weights always use the layout oneDNN prefers.
int ActivationPolicy() {
  static int policy = [] {
    const char* v = std::getenv("LUNGCT_ONEDNN_LAYOUT");
    return (v != nullptr && std::string(v) == "any") ? 1 : 0;
  }();
  return policy;
}

struct Plan {
  dnnl::primitive prim;
  memory::desc src, wei, dst;       // what the primitive wants
  memory::desc usrc, uwei, udst;    // what the buffers hold
  memory::desc scratch;             // its scratchpad (user mode: passed at every execution)
  std::string impl;
};

std::mutex g_mu;
// One convolution executes at a time. Each one already uses every core (OpenMP), and oneDNN's OpenMP kernels
// must not run concurrently from several XLA threads (e.g. 8 virtual devices): some JIT kernels spin on a
// barrier sized for the whole thread team and deadlocked when two teams competed for the cores.
std::mutex g_exec_mu;
std::map<std::string, std::shared_ptr<Plan>>* g_plans = new std::map<std::string, std::shared_ptr<Plan>>();
// The scratchpad of the executing convolution (page-aligned), grown to the largest one needed; guarded by
// g_exec_mu like the execution itself.
struct Scratch {
  void* ptr = nullptr;
  size_t size = 0;
  void* Get(size_t bytes) {
    if (bytes > size) {
      std::free(ptr);
      size = (bytes + 4095) / 4096 * 4096;
      ptr = std::aligned_alloc(4096, size);
      if (ptr == nullptr) { size = 0; throw std::bad_alloc(); }
    }
    return ptr;
  }
};
Scratch* g_scratch = new Scratch();

std::string Key(int kind, const memory::dims& x, const memory::dims& w, const memory::dims& y,
                memory::data_type tx, memory::data_type tw, memory::data_type ty,
                const memory::dims& s, const memory::dims& d, const memory::dims& pl, const memory::dims& pr) {
  std::ostringstream k;
  k << kind << ActivationPolicy() << '|' << int(tx) << ',' << int(tw) << ',' << int(ty) << '|';
  for (const auto* v : {&x, &w, &y, &s, &d, &pl, &pr}) {
    for (auto d : *v) k << d << ',';
    k << '|';
  }
  return k.str();
}

std::shared_ptr<Plan> MakePlan(int kind, const memory::dims& x, const memory::dims& w,
                               const memory::dims& y, memory::data_type tx, memory::data_type tw,
                               memory::data_type ty, const memory::dims& s, const memory::dims& d,
                               const memory::dims& pl, const memory::dims& pr) {
  using tag = memory::format_tag;
  auto plan = std::make_shared<Plan>();
  plan->usrc = memory::desc(x, tx, tag::ndhwc);
  plan->uwei = memory::desc(w, tw, tag::dhwio);
  plan->udst = memory::desc(y, ty, tag::ndhwc);
  const bool any_act = ActivationPolicy() == 1;
  memory::desc src = any_act ? memory::desc(x, tx, tag::any) : plan->usrc;
  memory::desc dst = any_act ? memory::desc(y, ty, tag::any) : plan->udst;
  memory::desc wei(w, tw, tag::any);
  auto& eng = Engine();
  const auto alg = dnnl::algorithm::convolution_direct;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // see the note at the top
  // The forward descriptor: the primitive itself, or the hint of a backward one. For the hint the
  // forward's types follow the activations (a bf16 backward hints with a bf16 forward).
  memory::data_type act = (kind == kForward) ? tx : (kind == kBackwardData ? ty : tx);
  memory::desc fsrc = (kind == kForward) ? src : memory::desc(x, act, any_act ? tag::any : tag::ndhwc);
  memory::desc fwei = (kind == kForward) ? wei : memory::desc(w, act, tag::any);
  memory::desc fdst = (kind == kForward) ? dst : memory::desc(y, act, any_act ? tag::any : tag::ndhwc);
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, alg, fsrc, fwei,
                                                fdst, s, d, pl, pr, attr);
  if (kind == kForward) {
    plan->prim = dnnl::convolution_forward(fwd);
    plan->src = fwd.src_desc(); plan->wei = fwd.weights_desc(); plan->dst = fwd.dst_desc();
    plan->impl = fwd.impl_info_str();
    plan->scratch = fwd.scratchpad_desc();
  } else if (kind == kBackwardData) {
    dnnl::convolution_backward_data::primitive_desc bwd(eng, alg, src, wei, dst, s, d, pl, pr, fwd, attr);
    plan->prim = dnnl::convolution_backward_data(bwd);
    plan->src = bwd.diff_src_desc(); plan->wei = bwd.weights_desc(); plan->dst = bwd.diff_dst_desc();
    plan->impl = bwd.impl_info_str();
    plan->scratch = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(eng, alg, src, wei, dst, s, d, pl, pr, fwd, attr);
    plan->prim = dnnl::convolution_backward_weights(bwd);
    plan->src = bwd.src_desc(); plan->wei = bwd.diff_weights_desc(); plan->dst = bwd.diff_dst_desc();
    plan->impl = bwd.impl_info_str();
    plan->scratch = bwd.scratchpad_desc();
  }
  return plan;
}

std::shared_ptr<Plan> GetPlan(int kind, const memory::dims& x, const memory::dims& w,
                              const memory::dims& y, memory::data_type tx, memory::data_type tw,
                              memory::data_type ty, const memory::dims& s, const memory::dims& d,
                              const memory::dims& pl, const memory::dims& pr) {
  const std::string key = Key(kind, x, w, y, tx, tw, ty, s, d, pl, pr);
  {
    std::lock_guard<std::mutex> lock(g_mu);
    auto it = g_plans->find(key);
    if (it != g_plans->end()) return it->second;
  }
  auto plan = MakePlan(kind, x, w, y, tx, tw, ty, s, d, pl, pr);
  std::lock_guard<std::mutex> lock(g_mu);
  return g_plans->emplace(key, plan).first->second;
}

memory::dims ActDims(ffi::AnyBuffer::Dimensions d) {  // (N, D, H, W, C) -> oneDNN's (N, C, D, H, W)
  return {d[0], d[4], d[1], d[2], d[3]};
}
memory::dims WeiDims(ffi::AnyBuffer::Dimensions d) {  // (KD, KH, KW, I, O) -> (O, I, KD, KH, KW)
  return {d[4], d[3], d[0], d[1], d[2]};
}

ffi::Error Run(int kind, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer y,
               ffi::Span<const int64_t> strides, ffi::Span<const int64_t> dilation,
               ffi::Span<const int64_t> pad_lo, ffi::Span<const int64_t> pad_hi) {
  if (x.dimensions().size() != 5 || w.dimensions().size() != 5 || y.dimensions().size() != 5 ||
      strides.size() != 3 || dilation.size() != 3 || pad_lo.size() != 3 || pad_hi.size() != 3) {
    return ffi::Error::InvalidArgument("lungct onednn_conv: expects 5-D NDHWC/DHWIO buffers and 3 strides/dilations/pads");
  }
  memory::data_type tx, tw, ty;
  if (!ToDnnl(x.element_type(), &tx) || !ToDnnl(w.element_type(), &tw) || !ToDnnl(y.element_type(), &ty)) {
    return ffi::Error::InvalidArgument("lungct onednn_conv: element types must be f32, bf16 or f16");
  }
  const memory::dims s(strides.begin(), strides.end()), d(dilation.begin(), dilation.end()),
      pl(pad_lo.begin(), pad_lo.end()), pr(pad_hi.begin(), pad_hi.end());
  try {
    auto plan = GetPlan(kind, ActDims(x.dimensions()), WeiDims(w.dimensions()), ActDims(y.dimensions()),
                        tx, tw, ty, s, d, pl, pr);
    auto& eng = Engine();
    std::lock_guard<std::mutex> exec_lock(g_exec_mu);
    dnnl::stream strm(eng);
    memory usrc(plan->usrc, eng, x.untyped_data());
    memory uwei(plan->uwei, eng, w.untyped_data());
    memory udst(plan->udst, eng, y.untyped_data());
    // Which of the three is written: dst (forward), src (backward data), weights (backward weights).
    const bool out_src = kind == kBackwardData, out_wei = kind == kBackwardWeights, out_dst = kind == kForward;
    auto prepare = [&](memory& user, const memory::desc& want, bool is_output) {
      if (user.get_desc() == want) return user;
      memory m(want, eng);
      if (!is_output) dnnl::reorder(user, m).execute(strm, user, m);
      return m;
    };
    memory msrc = prepare(usrc, plan->src, out_src);
    memory mwei = prepare(uwei, plan->wei, out_wei);
    memory mdst = prepare(udst, plan->dst, out_dst);
    std::unordered_map<int, memory> args;
    if (kind == kForward) {
      args = {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_WEIGHTS, mwei}, {DNNL_ARG_DST, mdst}};
    } else if (kind == kBackwardData) {
      args = {{DNNL_ARG_DIFF_SRC, msrc}, {DNNL_ARG_WEIGHTS, mwei}, {DNNL_ARG_DIFF_DST, mdst}};
    } else {
      args = {{DNNL_ARG_SRC, msrc}, {DNNL_ARG_DIFF_WEIGHTS, mwei}, {DNNL_ARG_DIFF_DST, mdst}};
    }
    const size_t scratch_bytes = plan->scratch.get_size();
    if (scratch_bytes > 0) args.insert({DNNL_ARG_SCRATCHPAD, memory(plan->scratch, eng, g_scratch->Get(scratch_bytes))});
    plan->prim.execute(strm, args);
    memory& out_m = out_src ? msrc : (out_wei ? mwei : mdst);
    memory& out_u = out_src ? usrc : (out_wei ? uwei : udst);
    if (out_m.get_data_handle() != out_u.get_data_handle()) dnnl::reorder(out_m, out_u).execute(strm, out_m, out_u);
    strm.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("lungct onednn_conv: oneDNN error: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("lungct onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   ffi::Span<const int64_t> s, ffi::Span<const int64_t> d, ffi::Span<const int64_t> pl,
                   ffi::Span<const int64_t> pr) {
  return Run(kForward, x, w, *y, s, d, pl, pr);
}
ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Span<const int64_t> s, ffi::Span<const int64_t> d, ffi::Span<const int64_t> pl,
                        ffi::Span<const int64_t> pr) {
  return Run(kBackwardData, *dx, w, dy, s, d, pl, pr);
}
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           ffi::Span<const int64_t> s, ffi::Span<const int64_t> d, ffi::Span<const int64_t> pl,
                           ffi::Span<const int64_t> pr) {
  return Run(kBackwardWeights, x, *dw, dy, s, d, pl, pr);
}

}  // namespace

#define LUNGCT_BIND                                                          \
  ffi::Ffi::Bind()                                                           \
      .Arg<ffi::AnyBuffer>()                                                 \
      .Arg<ffi::AnyBuffer>()                                                 \
      .Ret<ffi::AnyBuffer>()                                                 \
      .Attr<ffi::Span<const int64_t>>("strides")                             \
      .Attr<ffi::Span<const int64_t>>("dilation")                            \
      .Attr<ffi::Span<const int64_t>>("pad_lo")                              \
      .Attr<ffi::Span<const int64_t>>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(LungctOnednnConvFwd, Forward, LUNGCT_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LungctOnednnConvBwdData, BackwardData, LUNGCT_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(LungctOnednnConvBwdWeights, BackwardWeights, LUNGCT_BIND);

// The implementation oneDNN picked for a convolution (for benchmarks/diagnostics): kind 0/1/2, shapes in
// JAX order, f32, kernel dilation d (oneDNN's convention). Returns the length written (truncated to cap).
extern "C" int lungct_onednn_impl(int kind, const int64_t* x, const int64_t* w, const int64_t* y,
                                  const int64_t* s, const int64_t* d, const int64_t* pl, const int64_t* pr,
                                  int dtype, char* buf, int cap) {
  try {
    memory::data_type t = dtype == 1 ? memory::data_type::bf16 : memory::data_type::f32;
    auto plan = GetPlan(kind, {x[0], x[4], x[1], x[2], x[3]}, {w[4], w[3], w[0], w[1], w[2]},
                        {y[0], y[4], y[1], y[2], y[3]}, t, t, t, {s[0], s[1], s[2]}, {d[0], d[1], d[2]},
                        {pl[0], pl[1], pl[2]}, {pr[0], pr[1], pr[2]});
    std::string info = plan->impl + (plan->src == plan->usrc && plan->dst == plan->udst ? " (plain)" : " (reordered)");
    int n = static_cast<int>(info.size()) < cap - 1 ? static_cast<int>(info.size()) : cap - 1;
    info.copy(buf, n);
    buf[n] = 0;
    return n;
  } catch (const std::exception& e) {
    return -1;
  }
}

namespace {
memory::data_type DtypeCode(int code) {  // the Python side's codes: 0 f32, 1 bf16, 2 f16
  return code == 1 ? memory::data_type::bf16 : (code == 2 ? memory::data_type::f16 : memory::data_type::f32);
}
}  // namespace

// Whether oneDNN can run one convolution call here: creates (and caches) its primitive, kind 0/1/2, shapes
// in JAX order, element types of the three buffers (x, w, y) as codes 0 f32, 1 bf16, 2 f16. Returns 0, or
// -1 with oneDNN's message in buf (truncated to cap). Called at trace time, so an unsupported ISA/dtype
// falls back to XLA's convolution instead of failing at run time.
extern "C" int lungct_onednn_check(int kind, const int64_t* x, const int64_t* w, const int64_t* y,
                                   const int64_t* s, const int64_t* pl, const int64_t* pr, int tx, int tw,
                                   int ty, char* buf, int cap) {
  std::string msg;
  try {
    GetPlan(kind, {x[0], x[4], x[1], x[2], x[3]}, {w[4], w[3], w[0], w[1], w[2]}, {y[0], y[4], y[1], y[2], y[3]},
            DtypeCode(tx), DtypeCode(tw), DtypeCode(ty), {s[0], s[1], s[2]}, {0, 0, 0}, {pl[0], pl[1], pl[2]},
            {pr[0], pr[1], pr[2]});
    return 0;
  } catch (const std::exception& e) {
    msg = e.what();
  }
  int n = static_cast<int>(msg.size()) < cap - 1 ? static_cast<int>(msg.size()) : cap - 1;
  msg.copy(buf, n);
  buf[n] = 0;
  return -1;
}

// The instruction set oneDNN's kernels use here (after ONEDNN_MAX_CPU_ISA), e.g. "avx2".
extern "C" const char* lungct_onednn_isa() {
  using isa = dnnl::cpu_isa;
  switch (dnnl::get_effective_cpu_isa()) {
    case isa::sse41: return "sse41";
    case isa::avx: return "avx";
    case isa::avx2: return "avx2";
    case isa::avx2_vnni: return "avx2_vnni";
    case isa::avx2_vnni_2: return "avx2_vnni_2";
    case isa::avx512_core: return "avx512_core";
    case isa::avx512_core_vnni: return "avx512_core_vnni";
    case isa::avx512_core_bf16: return "avx512_core_bf16";
    case isa::avx512_core_fp16: return "avx512_core_fp16";
    case isa::avx512_core_amx: return "avx512_core_amx";
    case isa::avx512_core_amx_fp16: return "avx512_core_amx_fp16";
    default: return "unknown";
  }
}
