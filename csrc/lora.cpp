// lowrank::lora_add in C++: a LoRA adapter's addition to its layer's output, one autograd node;
// and lowrank::nf4_lora_linear, the same with its 4-bit base (Note: QLoRA in one node, below).
// lowrank/ops/lora_ops.py (Note: lora_add, Note: nf4_lora_linear) is the specification: the
// checks, the reference kernels and their Python autograd (the schemas are library.py's); this is
// the same math without Python.
//
// Note: LoRA in one node. The eager LoRA path, lora_B(lora_A(x)) * s added to the base's output
// (PEFT's order, which lowrank keeps to the bit), costs two nn.Linear module calls, a mul and an
// add, and records ten autograd nodes (View, Mm, T and UnsafeView for each linear; Mul; Add),
// each one a Python-free but not free step of the engine, some with saved tensors that
// activation checkpointing packs and unpacks one by one. On the 2-core EPYC of
// docs/benchmarks.md that was 91 us of a 4-bit LoRA layer's 163 us forward + backward, and a
// QLoRA step of Llama-2-7B pays it for 224 layers, three times with checkpointing, while the GPU
// waits. Here the same aten calls run in one torch::autograd::Function (node
// CppNode<lowrank::LoraAdd>): forward u = linear(x, A), then s * linear(u, B) + y; backward
// the gradients autograd's own nodes would give, in their order and with their layouts
// (mm_grad_mat1 / mm_grad_mat2 below follow torch's mm_mat1_backward / mm_mat2_backward), so the
// results equal the eager path's bit for bit where LoraLinear uses this op (x contiguous: matmul
// folds (..., K) into (M, K) for mm, as here; tests/ops/test_lora_add.py).
#include <ATen/autocast_mode.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "autograd.h"
#include "dispatch.h"
#include "lora_checks.h"
#include "message.h"

namespace lowrank {
namespace {

// The adapter's input, x or its dropped-out copy (Note: dropout in the LoRA ops, lora_ops.py), once
// the dropout arguments are checked (lora_ops.py's _adapter_input)
const at::Tensor& adapter_input(const at::Tensor& x, const OptTensor& dropped, const OptTensor& keep) {
  check_dropout(x, dropped, keep);
  return defined(dropped) ? *dropped : x;
}

// x's gradient from its dropped-out copy's, as eager autograd's nodes give it: cast back to x's
// dtype (ToCopyBackward0, under autocast), then the dropout's node: MulBackward0 (grad * noise)
// for at::dropout's composite path, NativeDropoutBackward0 for at::native_dropout's mask.
at::Tensor dropout_backward(const at::Tensor& grad, const at::Tensor& keep, double keep_scale,
                            at::ScalarType x_dtype) {
  const at::Tensor g = grad.scalar_type() == x_dtype ? grad : grad.to(x_dtype);
  return keep.scalar_type() == at::kBool ? at::native_dropout_backward(g, keep, keep_scale) : at::mul(g, keep);
}

// Note: a scale of a power of two. When |s| = 2^k, k >= 0 (LoraConfig's default alpha = r gives
// 1, alpha = 2r gives 2), s times a number of the dtype is exact: only the exponent moves, unless
// it overflows. Then the eager path's mul-then-add rounds the exact y + s v once, and so does
// add with alpha = s, which forms y + s v in the dtype's opmath (float for bf16, where the
// product is exact too): the same bits from one elementwise kernel instead of two, one pass
// over the (..., out) output fewer. Not for float16 with |s| > 1, whose overflow (65504) comes
// below float's: the eager path would give inf where add, in float, might not. With s = 1
// backward skips the multiplication of the output's gradient (x 1 is exact) when that gradient
// is contiguous (then the product would have been too).
bool scale_folds(double scale, at::ScalarType dtype) {
  int exponent = 0;
  const double mantissa = std::frexp(std::abs(scale), &exponent);  // |s| = mantissa 2^exponent, mantissa in [0.5, 1)
  return mantissa == 0.5 && exponent >= 1 && (exponent == 1 || dtype != at::kHalf);
}

// u = x A^T (..., r) and out = s * (u B^T) + y (..., out): the eager path's calls (the sum
// written into s u B^T, which IEEE addition leaves equal to y + s u B^T, so the output is
// always a fresh contiguous tensor, as lora_ops.py's fake kernel says; or one add, Note: a scale
// of a power of two, when y is contiguous). One difference to mind:
// eager matmul folds an x of 3 or more dimensions into rows whenever A requires grad, copying x
// if it must; below autograd A.t() does not require grad, so that fold is made here.
std::pair<at::Tensor, at::Tensor> forward_math(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                                               const at::Tensor& B, double scale) {
  check_args(y, x, A, B);
  at::Tensor u;
  if (x.dim() >= 3 && A.requires_grad()) {
    u = at::_unsafe_view_symint(rows(x, leading(x)).mm(A.t()), leading_then(x, A.sym_size(0)));
  } else {
    u = at::linear(x, A);
  }
  const at::Tensor v = at::linear(u, B);
  if (y.is_contiguous() && scale_folds(scale, v.scalar_type())) return {u, at::add(y, v, scale)};
  return {u, at::mul(v, scale).add_(y)};
}

// The gradients of mm(mat1, mat2) as autograd's MmBackward0 computes them (torch's
// FunctionsManual.cpp, mm_mat1_backward / mm_mat2_backward): an operand that was column-major
// gets its gradient column-major, through the transposed product.
bool column_major(const at::Tensor& t) { return t.sym_stride(0) == 1 && t.sym_stride(1) == t.sym_size(0); }

at::Tensor mm_grad_mat1(const at::Tensor& grad, const at::Tensor& mat2, bool mat1_column_major) {
  return mat1_column_major ? mat2.mm(grad.t()).t() : grad.mm(mat2.t());
}

at::Tensor mm_grad_mat2(const at::Tensor& grad, const at::Tensor& mat1, bool mat2_column_major) {
  return mat2_column_major ? grad.t().mm(mat1).t() : mat1.t().mm(grad);
}

// See Note: the factors are references.
using SavedData = ska::flat_hash_map<std::string, at::IValue>;  // AutogradContext::saved_data

// name: "A" or "B"; the tensor under that key, its version under "A_version" / "B_version"
void keep_factor(SavedData& d, const char* name, const char* version_key, const at::Tensor& t) {
  d[name] = t;
  d[version_key] = static_cast<int64_t>(t._version());
}

at::Tensor kept_factor(const SavedData& d, const char* name, const char* version_key, bool needed) {
  if (!needed) return at::Tensor();
  at::Tensor t = d.at(name).toTensor();
  const int64_t saved = d.at(version_key).toInt(), now = static_cast<int64_t>(t._version());
  TORCH_CHECK(now == saved, message("one of the variables needed for gradient computation has been modified by an "
                                    "inplace operation: lora_add's lora_", name, ", of shape ",
                                    sizes_text(t.sym_sizes()), ", is at version ", now, "; expected version ", saved,
                                    " instead (the factors are read, not copied: change them after backward)"));
  return t;
}

// What LoraAdd's backward needs, kept in ctx (x and u = x A^T as saved tensors, A and B by
// reference), and only what a needed gradient reads: x for A's, A for x's, u for B's, B for u's
// (which x's and A's go through); and the operands' layouts, which decide how each gradient is
// computed (MmBackward0 saves them as sizes and strides).
// Note: the factors are references. x and u are saved tensors, which activation checkpointing
// packs (a Python hook each, ~5-10 us on the CPU of docs/benchmarks.md) and recomputes. A and B
// are the adapter's parameters, alive anyway and the same after a recomputation: kept as
// references (as NF4Linear keeps the packed weight), with their version counters, so that a
// factor changed in place between forward and backward is refused as a saved tensor would be,
// not used.
// x_edge: the tensor whose gradient the node returns for the adapter's input (x, or what the
// dropout took: then the gradient goes back through keep), x the adapter's input.
void save_lora(AutogradContext* ctx, const at::Tensor& x_edge, const at::Tensor& x, const at::Tensor& u,
               const at::Tensor& A, const at::Tensor& B, double scale, const OptTensor& keep, double keep_scale) {
  const bool x_grad = x_edge.requires_grad(), A_grad = A.requires_grad(), B_grad = B.requires_grad();
  const c10::SymInt m = leading(x);
  ctx->save_for_backward({A_grad ? x : at::Tensor(), B_grad ? u : at::Tensor(),
                          x_grad && defined(keep) ? *keep : at::Tensor()});
  auto& d = ctx->saved_data;
  if (defined(keep)) {
    d["keep_scale"] = keep_scale;
    d["x_dtype"] = static_cast<int64_t>(x_edge.scalar_type());
  }
  if (x_grad) keep_factor(d, "A", "A_version", A);
  if (x_grad || A_grad) keep_factor(d, "B", "B_version", B);
  d["scale"] = scale;
  d["m"] = m;
  d["x_sizes"] = std::vector<c10::SymInt>(x.sym_sizes().begin(), x.sym_sizes().end());
  // x (..., in) folds into M rows: contiguous, as LoraLinear passes it, that is a view with
  // strides (in, 1), column-major only as one row of one; otherwise what reshape makes of it
  d["x2_column_major"] = x.is_contiguous() ? x.sym_size(-1) == 1 && m == 1 : column_major(rows(x, m));
  d["u2_column_major"] = column_major(rows(u, m));
  d["At_column_major"] = column_major(A.t());
  d["Bt_column_major"] = column_major(B.t());
}

// forward_math, then save_lora: the adapter's part of a node's forward (x the adapter's input
// edge, its dropout's dropped and keep when it has one)
at::Tensor lora_forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                        const at::Tensor& B, double scale, const OptTensor& dropped, const OptTensor& keep,
                        double keep_scale) {
  const at::Tensor& input = adapter_input(x, dropped, keep);
  auto [u, out] = forward_math(y, input, A, B, scale);
  save_lora(ctx, x, input, u, A, B, scale, keep, keep_scale);
  return out;
}

struct LoraGrads {
  at::Tensor x, A, B;
};

// Eager autograd's nodes from the output back: Add (y's gradient is the output's), Mul (times
// s), then for lora_B's linear UnsafeView (to M rows), Mm, T, and for lora_A's View and
// UnsafeView (M rows of r to (..., r) and back: a view both ways, same strides), Mm, T, View
// (to x's shape). grad (..., out) is the output's gradient; x_edge the edge of x, followed by
// A's and B's; only the gradients asked for.
LoraGrads lora_grads(AutogradContext* ctx, const at::Tensor& grad, size_t x_edge) {
  const bool x_grad = ctx->needs_input_grad(x_edge), A_grad = ctx->needs_input_grad(x_edge + 1),
             B_grad = ctx->needs_input_grad(x_edge + 2);
  LoraGrads g;
  if (!(x_grad || A_grad || B_grad)) return g;
  auto& d = ctx->saved_data;
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &x = saved[0], &u = saved[1], &keep = saved[2];
  const at::Tensor A = kept_factor(d, "A", "A_version", x_grad);
  const at::Tensor B = kept_factor(d, "B", "B_version", x_grad || A_grad);
  const c10::SymInt m = d["m"].toSymInt();
  const double scale = d["scale"].toDouble();
  const at::Tensor grad_v = rows(scale == 1.0 && grad.is_contiguous() ? grad : at::mul(grad, scale), m);  // (M, out)
  if (B_grad) g.B = mm_grad_mat2(grad_v, rows(u, m), d["Bt_column_major"].toBool()).t();  // (out, r)
  if (x_grad || A_grad) {
    const at::Tensor grad_u = mm_grad_mat1(grad_v, B.t(), d["u2_column_major"].toBool());  // (M, r)
    if (A_grad) g.A = mm_grad_mat2(grad_u, rows(x, m), d["At_column_major"].toBool()).t();  // (r, in)
    if (x_grad)  // (M, in) -> (..., in)
      g.x = mm_grad_mat1(grad_u, A.t(), d["x2_column_major"].toBool()).reshape_symint(d["x_sizes"].toSymIntVector());
    if (x_grad && keep.defined())  // through the dropout: See Note: dropout in the LoRA ops (lora_ops.py)
      g.x = dropout_backward(g.x, keep, d["keep_scale"].toDouble(),
                             static_cast<at::ScalarType>(d["x_dtype"].toInt()));
  }
  return g;
}

}  // namespace

// In namespace lowrank, not an anonymous one: its node is torch::autograd::CppNode<lowrank::LoraAdd>.
// out = y + s (x A^T) B^T      y (..., out), x (..., in), A (r, in), B (out, r), M rows of x
// (with dropout, x's dropped-out copy in x's place: Note: dropout in the LoRA ops, lora_ops.py)
struct LoraAdd : torch::autograd::Function<LoraAdd> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                            const at::Tensor& B, double scale, const OptTensor& dropped, const OptTensor& keep,
                            double keep_scale) {
    at::AutoDispatchBelowADInplaceOrView below;
    return lora_forward(ctx, y, x, A, B, scale, dropped, keep, keep_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // (..., out)
    const LoraGrads g = lora_grads(ctx, grad, /*x_edge=*/1);
    const at::Tensor none;
    return {ctx->needs_input_grad(0) ? grad : none, g.x, g.A, g.B, none, none, none, none};
  }
};

// Note: QLoRA in one node. A LoRA adapter on a 4-bit base is lora_add(nf4_linear(x, W, b),
// x_lora, A, B, s) (x_lora = x, or dropout(x)): two ops, two autograd nodes. As one op
// (lowrank::nf4_lora_linear, lora_ops.py) it is one dispatcher call and one node, and LoraLinear
// makes no call of its base module (lora.py, Note: QLoRA in one op). The math is the two ops':
// the base's output below autograd (nf4_linear's kernel), then forward_math; backward LoraAdd's
// gradients, and nf4_linear's for x (nf4_linear_grad_input, the weight kept by reference) and for
// the bias. The adapter's operands come first in the schema, so that the engine receives x's two
// gradients as it did from the two nodes, the adapter's then the base's, and adds them in that
// order into a sum that other layers (q, k and v share their x) add to as well: floating-point
// addition does not associate, and the sum keeps the two ops' bits (tests/ops/test_nf4_lora_linear.py).
struct NF4LoraLinear : torch::autograd::Function<NF4LoraLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x_lora, const at::Tensor& A, const at::Tensor& B,
                            double scale, const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                            const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                            c10::SymIntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias,
                            const OptTensor& dropped, const OptTensor& keep, double keep_scale) {
    save_weight(ctx, packed, absmax, nested_absmax, offset, shape, blocksize);
    // edges: x_lora, A, B, x, packed, absmax, [nested_absmax], [offset], [bias] (the defined tensors)
    ctx->saved_data["bias_edge"] = defined(bias) ? 6 + defined(nested_absmax) + defined(offset) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView below;
    const at::Tensor y = linear_op().call(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
    return lora_forward(ctx, y, x_lora, A, B, scale, dropped, keep, keep_scale);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad = grads[0];  // (..., out)
    const LoraGrads g = lora_grads(ctx, grad, /*x_edge=*/0);
    at::Tensor grad_x, grad_b;
    if (ctx->needs_input_grad(3)) {  // (..., out) @ (out, in) -> (..., in)
      const Weight w = saved_weight(ctx);
      grad_x = grad_input_op().call(grad, w.packed, w.absmax, w.nested_absmax, w.offset, w.shape, w.blocksize);
    }
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    if (bias_edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(bias_edge)))  // (out,)
      grad_b = bias_grad(grad);
    const at::Tensor none;
    return {g.x, g.A, g.B, none, grad_x, none, none, none, none, none, none, grad_b, none, none, none};
  }
};

namespace {

at::Tensor lora_add_kernel(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                           double scale, const OptTensor& dropped, const OptTensor& keep, double keep_scale) {
  return forward_math(y, adapter_input(x, dropped, keep), A, B, scale).second;
}

at::Tensor lora_add_autograd(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                             double scale, const OptTensor& dropped, const OptTensor& keep, double keep_scale) {
  return LoraAdd::apply(y, x, A, B, scale, dropped, keep, keep_scale);
}

at::Tensor nf4_lora_linear_kernel(const at::Tensor& x_lora, const at::Tensor& A, const at::Tensor& B, double scale,
                                  const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                  const std::optional<at::Tensor>& nested_absmax,
                                  const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
                                  int64_t blocksize, const std::optional<at::Tensor>& bias, const OptTensor& dropped,
                                  const OptTensor& keep, double keep_scale) {
  const at::Tensor y = linear_op().call(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
  return forward_math(y, adapter_input(x_lora, dropped, keep), A, B, scale).second;
}

at::Tensor nf4_lora_linear_autograd(const at::Tensor& x_lora, const at::Tensor& A, const at::Tensor& B, double scale,
                                    const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                    const std::optional<at::Tensor>& nested_absmax,
                                    const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
                                    int64_t blocksize, const std::optional<at::Tensor>& bias,
                                    const OptTensor& dropped, const OptTensor& keep, double keep_scale) {
  return NF4LoraLinear::apply(x_lora, A, B, scale, x, packed, absmax, nested_absmax, offset, shape, blocksize, bias,
                              dropped, keep, keep_scale);
}

using LoraAddSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                              const OptTensor&, const OptTensor&, double);

// Under autocast: x, A and B cast as F.linear's rule casts them (autocast's lower-precision list,
// through its cache, so a leaf x or a factor cast for another op in the same region is cast once,
// as in the eager path); y is not (the eager path's add has no autocast rule), so it must
// already be in autocast's dtype, which the base's autocast output is. With dropout the adapter
// reads dropped, which is cast instead of x (x then only takes the gradient, in its own dtype).
template <c10::DeviceType device>
at::Tensor lora_add_autocast(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                             double scale, const OptTensor& dropped, const OptTensor& keep, double keep_scale) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::lora_add", "").typed<LoraAddSig>();
  c10::impl::ExcludeDispatchKeyGuard no_autocast(at::autocast::get_autocast_dispatch_key_from_device_type(device));
  const at::ScalarType dtype = at::autocast::get_lower_precision_fp_from_device_type(device);
  const auto cast = [&](const at::Tensor& t) { return at::autocast::cached_cast(dtype, t, device); };
  if (defined(dropped)) return op.call(y, x, cast(A), cast(B), scale, cast(*dropped), keep, keep_scale);
  return op.call(y, cast(x), cast(A), cast(B), scale, dropped, keep, keep_scale);
}

}  // namespace

// lora_ops.py's dropout_parts, the same calls without Python between them (at::dropout's two
// paths: at::native_dropout on CUDA, else the noise bernoulli(1 - p) / (1 - p) in x's layout).
std::tuple<at::Tensor, at::Tensor, double> dropout_parts(const at::Tensor& x_in, double p) {
  TORCH_CHECK(p > 0.0 && p < 1.0 && x_in.numel() > 0 && (x_in.is_cpu() || x_in.is_cuda()),
              "dropout_parts needs 0 < p < 1 and a non-empty x on the CPU or CUDA");
  const at::Tensor x = x_in.detach();
  if (x.is_cuda()) {
    auto [dropped, mask] = at::native_dropout(x, p, true);
    return {dropped, mask, 1.0 / (1.0 - p)};
  }
  at::Tensor noise = at::empty_like(x);
  noise.bernoulli_(1 - p);
  noise.div_(1 - p);
  return {at::mul(x, noise), noise, 1.0};
}

// See Note: LoRA in one node. With register_autograd (autograd.cpp), instead of lora_ops.py's
// register_python_ops: lora_add's kernel for every device, its autograd and its autocast rule
// (CPU and CUDA), and nf4_lora_linear's kernel and autograd, once a process.
void register_lora_ops() {
  static torch::Library* lib = [] {
    auto* l = new torch::Library(torch::Library::IMPL, "lowrank", std::nullopt, __FILE__, __LINE__);
    l->impl("lora_add", torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(lora_add_kernel)));
    l->impl("lora_add", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(lora_add_autograd)));
    l->impl("lora_add", torch::dispatch(c10::DispatchKey::AutocastCPU, TORCH_FN(lora_add_autocast<c10::kCPU>)));
    l->impl("lora_add", torch::dispatch(c10::DispatchKey::AutocastCUDA, TORCH_FN(lora_add_autocast<c10::kCUDA>)));
    // See Note: QLoRA in one node. No autocast rule: LoraLinear calls it only where every operand
    // is in the dtype the layer computes in, and autocast falls through for it.
    l->impl("nf4_lora_linear",
            torch::dispatch(c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(nf4_lora_linear_kernel)));
    l->impl("nf4_lora_linear", torch::dispatch(c10::DispatchKey::Autograd, TORCH_FN(nf4_lora_linear_autograd)));
    return l;
  }();
  (void)lib;
}

}  // namespace lowrank
