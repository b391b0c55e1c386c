// The torch side of lowrank._C: tensors in, checks, threads, raw pointers out to the kernels.
//
//   nf4_dequantize_cpu(packed, absmax, nested_absmax?, offset?, shape, blocksize, dtype) -> W[shape]
//   nf4_linear_cpu(x[..., K], packed, absmax, nested_absmax?, offset?, shape=[N, K], blocksize, bias?)
//       -> x @ W^T + bias, [..., N] in x.dtype                            (1 <= M = x.numel() / K <= 16)
//
// Same arguments, in the same order, as the lowrank:: ops (lowrank/ops/library.py); lowrank/ops/csrc.py
// registers these functions as the "csrc" backend of those ops and sends anything they do not
// cover to the reference. The CUDA functions live in bindings_cuda.cpp.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "dispatch.h"
#include "message.h"
#include "nf4_cpu.h"
#include "nf4_cpu_chunks.h"

namespace lowrank {

// Shared with bindings_cuda.cpp: the view of one quantized weight, after checking its tensors.
NF4View nf4_view(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                 const std::optional<at::Tensor>& offset, at::IntArrayRef shape, int64_t blocksize) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK(blocksize >= 2 && blocksize % 2 == 0, message("blocksize must be even and >= 2, got ", blocksize));
  TORCH_CHECK(packed.dtype() == at::kByte && packed.is_contiguous() && packed.numel() == (numel + 1) / 2,
              message("packed must be a contiguous uint8 tensor of ", (numel + 1) / 2, " bytes for shape ", shape,
                      "; got ", packed.sizes(), " ", packed.dtype()));
  const bool nested = nested_absmax.has_value();
  TORCH_CHECK(nested == offset.has_value(),
              message("nested_absmax and offset go together (double quantization): got ",
                      nested ? "nested_absmax without offset" : "offset without nested_absmax"));
  const auto absmax_dtype = nested ? at::kByte : at::kFloat;
  TORCH_CHECK(absmax.device() == packed.device(),
              message("absmax must be on ", packed.device(), " (packed's device), got ", absmax.device()));
  TORCH_CHECK(absmax.dtype() == absmax_dtype && absmax.is_contiguous() && absmax.numel() == blocks,
              message("absmax must be ", blocks, " contiguous ", absmax_dtype, " values for shape ", shape,
                      " and blocksize ", blocksize, "; got ", absmax.sizes(), " ", absmax.dtype()));
  NF4View w{packed.data_ptr<uint8_t>(), absmax.data_ptr(), nullptr, nullptr, numel, blocksize};
  if (nested) {
    const at::Tensor& na = *nested_absmax;
    const int64_t nested_blocks = (blocks + kNestedBlocksize - 1) / kNestedBlocksize;
    TORCH_CHECK(na.dtype() == at::kFloat && na.is_contiguous() && na.numel() == nested_blocks,
                message("nested_absmax must be ", nested_blocks, " contiguous float32 values; got ", na.sizes(), " ",
                        na.dtype()));
    TORCH_CHECK(offset->numel() == 1 && offset->dtype() == at::kFloat,
                message("offset must be one float32 value; got ", offset->sizes(), " ", offset->dtype()));
    for (const at::Tensor* t : {&na, &*offset})
      TORCH_CHECK(t->device() == packed.device(), message("every tensor of the weight must be on ", packed.device(),
                                                          " (packed's device), got one on ", t->device()));
    w.nested = na.data_ptr<float>();
    w.offset = offset->data_ptr<float>();
  }
  return w;
}

namespace {

OutType out_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return OutType::kFloat32;
    case at::kHalf: return OutType::kFloat16;
    case at::kBFloat16: return OutType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_VALUE(false, message("dtype must be float32, float16 or bfloat16, got ", dtype));
  return OutType::kFloat32;  // not reached
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), message(name, " must be on the CPU for lowrank._C's CPU kernels, got ", t.device()));
}

// Note: huge pages for the output. A fresh 32 MiB tensor is untouched memory (glibc maps it
// anew for each allocation); writing it first costs one page fault per 4 KiB page: ~8 ms for
// 4096 x 4096 bf16 on the 2-core EPYC of docs/csrc.md, against ~0.7 ms for the kernel itself.
// Outputs of 4 MiB and more therefore come from this allocator: 2 MiB-aligned memory marked
// MADV_HUGEPAGE (effective where /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or
// "always"), one fault per 2 MiB. The tensor is an ordinary one (storage offset 0, resizable,
// freed with free()); where the kernel refuses the advice nothing changes but the alignment.
struct HugePageAllocator final : c10::Allocator {
  static constexpr size_t kHuge = size_t{1} << 21;
  static void release(void* p) { std::free(p); }
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    if (n > 0 && posix_memalign(&p, kHuge, n) != 0)
      TORCH_CHECK(false, message("out of memory allocating ", n, " bytes"));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kHuge) (void)madvise(p, n & ~(kHuge - 1), MADV_HUGEPAGE);
#endif
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

at::Tensor empty_output(at::IntArrayRef shape, at::ScalarType dtype) {
  static HugePageAllocator allocator;
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (numel * static_cast<int64_t>(c10::elementSize(dtype)) < (int64_t{4} << 20)) return at::empty(shape, at::dtype(dtype));
  return at::detail::empty_generic(shape, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

void dequantize_into(const NF4View& w, OutType type, const at::Tensor& out) {
  dequantize_parallel(w, type, out.data_ptr(), 0, (w.numel + w.blocksize - 1) / w.blocksize);
}

at::Tensor dequantize_op(const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                              at::IntArrayRef shape, int64_t blocksize, at::ScalarType dtype) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  const OutType type = out_type(dtype);
  at::Tensor out = empty_output(shape, dtype);  // See Note: huge pages for the output
  dequantize_into(w, type, out);
  return out;
}

// The kernel alone, into a tensor the caller made (benchmarks: the time without page faults).
void dequantize_into_op(const at::Tensor& out, const at::Tensor& packed, const at::Tensor& absmax,
                        const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                        at::IntArrayRef shape, int64_t blocksize) {
  check_cpu(packed, "packed");
  check_cpu(absmax, "absmax");
  check_cpu(out, "out");
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  TORCH_CHECK(out.is_contiguous() && out.numel() == w.numel,
              message("out must be contiguous with ", w.numel, " elements"));
  dequantize_into(w, out_type(out.scalar_type()), out);
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                          at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&x, &packed, &absmax}) check_cpu(*t, "every tensor");
  TORCH_CHECK(shape.size() == 2, message("the weight must be 2-d [N, K], got shape ", shape));
  const int64_t N = shape[0], K = shape[1];
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, message("x must be [..., K] with K = ", K, ", got ", x.sizes()));
  TORCH_CHECK(K > 0 && K % kGemvGroup == 0 && K % blocksize == 0,
              message("K must be a positive multiple of 32 and of blocksize ", blocksize, ", got K = ", K));
  const int64_t M = x.numel() / K;
  TORCH_CHECK(M >= 1 && M <= kGemvMaxRows,
              message("x must have 1 to ", kGemvMaxRows, " rows (x.numel() / K), got ", M));
  const OutType wtype = out_type(x.scalar_type());  // W is dequantized in x's dtype, as the reference does
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);

  at::Tensor bf;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, message("bias must hold N = ", N, " values, got ", bias->sizes()));
    bf = bias->to(at::kFloat).contiguous();
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));  // [M, N] float32
  const float* bias_ptr = bf.defined() ? bf.data_ptr<float>() : nullptr;
  float* y_ptr = y.data_ptr<float>();
  bool done = false;
  if (wtype == OutType::kBFloat16 && nf4_gemv_bf16_covers(w)) {  // vdpbf16ps (csrc/nf4_cpu_avx512.cpp)
    const at::Tensor xc = x.reshape({M, K}).contiguous();
    at::Tensor xb = at::empty({M, K}, xc.options());
    const auto* x_bits = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
    auto* xb_bits = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
    const float scale_min = nf4_gemv_pack_x_bf16(x_bits, M, K, xb_bits);
    if (scale_min >= 0.0f) {
      std::atomic<bool> ok{true};
      at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        if (!nf4_gemv_bf16_cpu(w, N, K, xb_bits, M, bias_ptr, y_ptr, n0, n1, scale_min)) ok = false;
      });
      done = ok;
    }
  }
  if (!done) {
    const at::Tensor xf = x.reshape({M, K}).to(at::kFloat).contiguous();  // [M, K] float32, exact
    at::Tensor xd = at::empty({M, K}, xf.options());
    nf4_gemv_pack_x(xf.data_ptr<float>(), M, K, xd.data_ptr<float>());
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      nf4_gemv_cpu(w, wtype, N, K, xd.data_ptr<float>(), M, bias_ptr, y_ptr, n0, n1);
    });
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  return y.to(x.scalar_type()).reshape(out_shape);  // one rounding to x.dtype (nearest even)
}

// See Note: the ops in C++ (dispatch.h). The CPU GEMV where csrc.py's _gemv_covers says it runs; else
// W a chunk at a time (nf4_cpu_chunks.cpp), which needs K % blocksize == 0 only (csrc.py's _chunks_cover).
at::Tensor cpu_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                    const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                    at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  const int64_t N = shape[0], K = shape[1];
  if (K <= 0 || N <= 0 || K % blocksize != 0 || x.numel() == 0) return {};  // K = 0: the reference's empty product
  if (x.numel() / K <= kGemvMaxRows && K % kGemvGroup == 0)
    return linear_op(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  return chunked_linear(x, w, N, K, out_type(x.scalar_type()), bias);
}

// The one above for lowrank/ops/csrc.py's Python kernels (LOWRANK_PYTHON_OPS=1 and the calls the C++
// ones hand back), so that both compute the same bits: K % blocksize == 0, checked.
at::Tensor linear_chunks_op(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                            at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  for (const at::Tensor* t : {&x, &packed, &absmax}) check_cpu(*t, "every tensor");
  TORCH_CHECK(shape.size() == 2 && shape[0] > 0 && shape[1] > 0 && shape[1] % blocksize == 0 && x.size(-1) == shape[1],
              message("W must be [N, K] with K a multiple of blocksize ", blocksize, " and x [..., K], got W ", shape,
                      ", x ", x.sizes()));
  const NF4View w = nf4_view(packed, absmax, nested_absmax, offset, shape, blocksize);
  return chunked_linear(x, w, shape[0], shape[1], out_type(x.scalar_type()), bias);
}

bool set_cpu_isa(const std::string& name) {
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Bf16})
    if (name == isa_name(isa)) return set_isa(isa);
  TORCH_CHECK_VALUE(false, message("cpu isa must be one of scalar, avx2, avx512, avx512bf16; got '", name, "'"));
  return false;  // not reached
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// See Note: the ops in C++ (dispatch.h): what the C++ kernels share with bindings_cuda.cpp
// ---------------------------------------------------------------------------------------------

bool csrc_chosen() {
  const char* python_ops = std::getenv("LOWRANK_PYTHON_OPS");  // "1": every call to the Python kernels (A/B)
  if (python_ops != nullptr && python_ops[0] == '1' && python_ops[1] == '\0') return false;
  const char* v = std::getenv("LOWRANK_BACKEND");  // read at every call, as backends.forced()
  if (v == nullptr) return true;
  std::string name;
  for (const char* c = v; *c != '\0'; ++c)
    if (*c != ' ' && *c != '\t' && *c != '\n') name += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  return name.empty() || name == "csrc";
}

bool weight_ok(const at::Tensor& packed, const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
               const std::optional<at::Tensor>& offset, at::IntArrayRef shape, int64_t blocksize) {
  bool blocksize_ok = false;
  for (int64_t b = 32; b <= 4096; b *= 2) blocksize_ok = blocksize_ok || blocksize == b;  // nf4.BLOCKSIZES
  if (!blocksize_ok) return false;
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;  // two negative sizes make a positive n
    n *= d;
  }
  const int64_t blocks = (n + blocksize - 1) / blocksize;
  const at::Device device = packed.device();
  if (!(packed.scalar_type() == at::kByte && packed.numel() == (n + 1) / 2 && packed.is_contiguous() &&
        absmax.numel() == blocks && absmax.device() == device && absmax.is_contiguous()))
    return false;
  if (!nested_absmax.has_value()) return !offset.has_value() && absmax.scalar_type() == at::kFloat;
  const at::Tensor& na = *nested_absmax;
  return offset.has_value() && absmax.scalar_type() == at::kByte && na.scalar_type() == at::kFloat &&
         na.numel() == (blocks + kNestedBlocksize - 1) / kNestedBlocksize && na.is_contiguous() &&
         na.device() == device && offset->scalar_type() == at::kFloat && offset->numel() == 1 &&
         offset->device() == device;
}

namespace {
bool float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }
}  // namespace

bool linear_ok(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
               const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
               at::IntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  return shape.size() == 2 && float_type(x.scalar_type()) && x.dim() >= 1 && x.size(-1) == shape[1] &&
         x.device() == packed.device() && weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize) &&
         (!bias.has_value() || (bias->dim() == 1 && bias->size(0) == shape[0] &&
                                bias->scalar_type() == x.scalar_type() && bias->device() == x.device()));
}

bool grad_input_ok(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                   const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                   at::IntArrayRef shape, int64_t blocksize) {
  return shape.size() == 2 && float_type(grad_y.scalar_type()) && grad_y.dim() >= 1 && grad_y.size(-1) == shape[0] &&
         grad_y.device() == packed.device() && weight_ok(packed, absmax, nested_absmax, offset, shape, blocksize);
}

namespace {

// library.py's kernels of nf4_dequantize, nf4_linear, nf4_linear_grad_input (set_python_kernels),
// held for the life of the process: never released, so nothing runs at interpreter shutdown.
PyObject* g_python_kernels[3] = {nullptr, nullptr, nullptr};

template <typename... Args>
at::Tensor call_python(int op, const Args&... args) {
  namespace py = pybind11;
  py::gil_scoped_acquire gil;
  TORCH_CHECK(g_python_kernels[op] != nullptr,
              "lowrank._C: the ops' Python kernels are not set (lowrank/ops/csrc.py sets them on import)");
  return py::reinterpret_borrow<py::object>(g_python_kernels[op])(args...).template cast<at::Tensor>();
}

std::vector<int64_t> concrete(c10::SymIntArrayRef shape) {
  const at::IntArrayRef s = C10_AS_INTARRAYREF_SLOW(shape);
  return {s.begin(), s.end()};
}

void set_python_kernels(pybind11::object dequantize, pybind11::object linear, pybind11::object grad_input) {
  pybind11::object fns[3] = {dequantize, linear, grad_input};
  for (int i = 0; i < 3; ++i) {
    Py_XDECREF(g_python_kernels[i]);
    g_python_kernels[i] = fns[i].release().ptr();
  }
}

}  // namespace

at::Tensor python_dequantize(const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef shape, int64_t blocksize, at::ScalarType dtype) {
  return call_python(0, packed, absmax, nested_absmax, offset, concrete(shape), blocksize, dtype);
}

at::Tensor python_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                         const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                         c10::SymIntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  return call_python(1, x, packed, absmax, nested_absmax, offset, concrete(shape), blocksize, bias);
}

at::Tensor python_grad_input(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                             const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                             c10::SymIntArrayRef shape, int64_t blocksize) {
  return call_python(2, grad_y, packed, absmax, nested_absmax, offset, concrete(shape), blocksize);
}

#ifdef LOWRANK_WITH_CUDA
void register_cuda(pybind11::module& m);  // bindings_cuda.cpp
#endif

}  // namespace lowrank

// See Note: the ops in C++ (dispatch.h). The schemas are library.py's; registering before they
// are defined is allowed (lowrank._C is imported by lowrank/ops/csrc.py, after library.py).
LOWRANK_REGISTER_OPS(CPU, &lowrank::dequantize_op, &lowrank::cpu_gemv)

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowrank's C++/CUDA NF4 kernels; lowrank/ops/csrc.py registers them as the 'csrc' backend";
  m.def("nf4_dequantize_cpu", &lowrank::dequantize_op);
  m.def("nf4_linear_cpu", &lowrank::linear_op);
  m.def("nf4_dequantize_cpu_into", &lowrank::dequantize_into_op, "the dequantize kernel into out (benchmarks)");
  m.def("nf4_linear_cpu_chunks", &lowrank::linear_chunks_op, "nf4_linear where the GEMV does not go, W a chunk at a time");
  m.def("cpu_isa", [] { return std::string(lowrank::isa_name(lowrank::current_isa())); });
  m.def("best_cpu_isa", [] { return std::string(lowrank::isa_name(lowrank::best_isa())); });
  m.def("set_cpu_isa", &lowrank::set_cpu_isa, "use this instruction set (at most the best one); false if the CPU lacks it");
  m.def("register_autograd", &lowrank::register_autograd,
        "registers the C++ autograd of nf4_linear and nf4_linear_grad_input (csrc/autograd.cpp), once");
  m.def("dropout_parts", &lowrank::dropout_parts,
        "lora_ops.dropout_parts's draws in one call: (dropped, keep, keep_scale) as F.dropout would draw them");
  m.def("set_python_kernels", &lowrank::set_python_kernels,
        "the ops' Python kernels (dequantize, linear, grad_input) the C++ kernels hand calls back to");
#ifdef LOWRANK_WITH_CUDA
  lowrank::register_cuda(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
