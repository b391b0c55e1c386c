// The autograd of nf4_linear and nf4_linear_grad_input in C++ (lowrank/ops/library.py, Note:
// autograd of nf4_linear, is the specification; this is the same math without Python).
//
// Note: autograd in C++. torch.library.register_autograd wraps the op in a Python
// autograd.Function: every call with grad enabled re-enters Python to fill defaults, build the
// Function and redispatch, and every backward runs _linear_backward in Python. On the 2-core EPYC
// of docs/benchmarks.md that layer was 17 us of a 39 us op call with grad (22 us without), and a
// QLoRA step makes two such calls a 4-bit linear (forward, and its recomputation under activation
// checkpointing) and one backward, 224 linears a Llama-2-7B step: on the GPU the step waited on
// this CPU work (docs/benchmarks.md, "a QLoRA step of the Llama-2-7B shape"). So when lowrank._C
// is loaded, lowrank/ops/csrc.py calls register_autograd() below instead of library.py's
// register_python_autograd(): one or the other owns the ops' Autograd key, never both.
//
// What is kept for backward is what the Python version keeps: the weight's tensors and numbers,
// as plain references (saved_data, like the Python version's ctx attributes, not saved tensors:
// activation checkpointing has nothing of this op to pack or recompute, and x is not kept).
// grad_x = nf4_linear_grad_input(grad_y, W) and grad_b = grad_y summed over every leading
// dimension; the backward of nf4_linear_grad_input is nf4_linear without bias, so double
// backward works. Both backwards call the ops through the dispatcher, so they reach the same
// kernels (and, while torch.compile traces, the same fake kernels) as a call from Python.
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "autograd.h"
#include "dispatch.h"

namespace lowrank {

const c10::TypedOperatorHandle<LinearSig>& linear_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::nf4_linear", "").typed<LinearSig>();
  return op;
}

const c10::TypedOperatorHandle<GradInputSig>& grad_input_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("lowrank::nf4_linear_grad_input", "").typed<GradInputSig>();
  return op;
}

void save_weight(AutogradContext* ctx, const at::Tensor& packed, const at::Tensor& absmax,
                 const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                 c10::SymIntArrayRef shape, int64_t blocksize) {
  ctx->saved_data["packed"] = packed;
  ctx->saved_data["absmax"] = absmax;
  ctx->saved_data["nested_absmax"] = nested_absmax;  // None or a tensor
  ctx->saved_data["offset"] = offset;
  ctx->saved_data["shape"] = std::vector<c10::SymInt>(shape.begin(), shape.end());
  ctx->saved_data["blocksize"] = blocksize;
}

Weight saved_weight(AutogradContext* ctx) {
  auto& d = ctx->saved_data;
  return {d["packed"].toTensor(), d["absmax"].toTensor(), d["nested_absmax"].toOptional<at::Tensor>(),
          d["offset"].toOptional<at::Tensor>(), d["shape"].toSymIntVector(), d["blocksize"].toInt()};
}

// In namespace lowrank, not an anonymous one: the node's name in y.grad_fn and in anomaly-mode
// traces is torch::autograd::CppNode<lowrank::NF4Linear>.
// y = x @ W^T + b
struct NF4Linear : torch::autograd::Function<NF4Linear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                            const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape, int64_t blocksize,
                            const std::optional<at::Tensor>& bias) {
    save_weight(ctx, packed, absmax, nested_absmax, offset, shape, blocksize);
    // The edges of backward's grads are the defined tensors among the arguments, in order (x,
    // packed, absmax, [nested_absmax, offset], [bias]): bias's is the last one when it is defined.
    ctx->saved_data["bias_edge"] = defined(bias) ? 3 + defined(nested_absmax) + defined(offset) : int64_t{-1};
    at::AutoDispatchBelowADInplaceOrView below;
    return linear_op().call(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor& grad_y = grads[0];  // (..., N)
    const Weight w = saved_weight(ctx);
    at::Tensor grad_x, grad_b;
    if (ctx->needs_input_grad(0))  // (..., N) @ (N, K) -> (..., K)
      grad_x = grad_input_op().call(grad_y, w.packed, w.absmax, w.nested_absmax, w.offset, w.shape, w.blocksize);
    const int64_t bias_edge = ctx->saved_data["bias_edge"].toInt();
    if (bias_edge >= 0 && ctx->needs_input_grad(static_cast<size_t>(bias_edge)))  // (N,)
      grad_b = bias_grad(grad_y);
    return {grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), grad_b};
  }
};

// grad_x = grad_y @ W, itself linear in grad_y: its backward is nf4_linear without bias.
struct NF4LinearGradInput : torch::autograd::Function<NF4LinearGradInput> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& grad_y, const at::Tensor& packed,
                            const at::Tensor& absmax, const std::optional<at::Tensor>& nested_absmax,
                            const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape, int64_t blocksize) {
    save_weight(ctx, packed, absmax, nested_absmax, offset, shape, blocksize);
    at::AutoDispatchBelowADInplaceOrView below;
    return grad_input_op().call(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Weight w = saved_weight(ctx);
    at::Tensor grad_grad_y;
    if (ctx->needs_input_grad(0))  // (..., K) @ W^T -> (..., N)
      grad_grad_y = linear_op().call(grads[0], w.packed, w.absmax, w.nested_absmax, w.offset, w.shape, w.blocksize,
                                     std::nullopt);
    return {grad_grad_y, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

namespace {

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const std::optional<at::Tensor>& nested_absmax, const std::optional<at::Tensor>& offset,
                           c10::SymIntArrayRef shape, int64_t blocksize, const std::optional<at::Tensor>& bias) {
  return NF4Linear::apply(x, packed, absmax, nested_absmax, offset, shape, blocksize, bias);
}

at::Tensor grad_input_autograd(const at::Tensor& grad_y, const at::Tensor& packed, const at::Tensor& absmax,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& offset, c10::SymIntArrayRef shape,
                               int64_t blocksize) {
  return NF4LinearGradInput::apply(grad_y, packed, absmax, nested_absmax, offset, shape, blocksize);
}

}  // namespace

// See Note: autograd in C++. Registered on request, once, for the life of the process (the
// Library is never destroyed, so nothing is deregistered at interpreter shutdown).
void register_autograd() {
  static torch::Library* lib = [] {
    auto* l = new torch::Library(torch::Library::IMPL, "lowrank", c10::DispatchKey::Autograd, __FILE__, __LINE__);
    l->impl("nf4_linear", TORCH_FN(linear_autograd));
    l->impl("nf4_linear_grad_input", TORCH_FN(grad_input_autograd));
    return l;
  }();
  (void)lib;
  register_lora_ops();
}

}  // namespace lowrank
