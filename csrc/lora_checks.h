// The argument checks of the LoRA ops' C++ kernels and autograd (lora.cpp): the conditions and
// messages of lowrank/ops/lora_ops.py's _check_lora_add and _adapter_input. Included by lora.cpp only.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "autograd.h"
#include "message.h"

namespace lowrank {

// x's leading sizes, then `last`: the shape of x A^T or of the output
inline std::vector<c10::SymInt> leading_then(const at::Tensor& x, const c10::SymInt& last) {
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end() - 1);
  shape.push_back(last);
  return shape;
}

inline std::string sizes_text(c10::SymIntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) s += ", ";
    const auto v = sizes[i].maybe_as_int();
    s += v ? std::to_string(*v) : std::string("?");
  }
  return s + "]";
}

// The checks of lora_ops.py's _check_lora_add, same conditions and messages.
inline void check_args(const at::Tensor& y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(A.dim() == 2 && B.dim() == 2,
              message("lora_A must be (r, in) and lora_B (out, r), got shapes ", sizes_text(A.sym_sizes()), " and ",
                      sizes_text(B.sym_sizes())));
  TORCH_CHECK(x.dim() >= 1 && x.sym_size(-1) == A.sym_size(1) && B.sym_size(1) == A.sym_size(0),
              message("x (..., in) must match lora_A (r, in) and lora_B (out, r); got x ", sizes_text(x.sym_sizes()),
                      ", lora_A ", sizes_text(A.sym_sizes()), ", lora_B ", sizes_text(B.sym_sizes())));
  const std::vector<c10::SymInt> out_shape = leading_then(x, B.sym_size(0));
  TORCH_CHECK(y.sym_sizes() == c10::SymIntArrayRef(out_shape),
              message("y must have the output's shape ", sizes_text(out_shape),
                      " (x's leading dimensions, lora_B's out), got ",
                      sizes_text(y.sym_sizes())));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && y.scalar_type() == x.scalar_type() &&
                  A.scalar_type() == x.scalar_type() && B.scalar_type() == x.scalar_type(),
              message("y, x (dropped, when given), lora_A and lora_B must share one floating dtype, got ", y.scalar_type(), ", ",
                      x.scalar_type(), ", ", A.scalar_type(), ", ", B.scalar_type()));
  TORCH_CHECK(y.device() == x.device() && A.device() == x.device() && B.device() == x.device(),
              message("y, x, lora_A and lora_B must be on one device, got ", y.device(), ", ", x.device(), ", ",
                      A.device(), ", ", B.device()));
}

using OptTensor = std::optional<at::Tensor>;

// The checks of lora_ops.py's _adapter_input (Note: dropout in the LoRA ops, there): dropped and
// keep both or neither, x's shape, keep bool or x's floating dtype, one device.
inline void check_dropout(const at::Tensor& x, const OptTensor& dropped, const OptTensor& keep) {
  TORCH_CHECK(defined(dropped) == defined(keep),
              message("dropped and keep go together (x's dropped-out copy and the dropout's noise or mask), got dropped ",
                      defined(dropped) ? "a tensor" : "None", " and keep ", defined(keep) ? "a tensor" : "None"));
  if (!defined(keep)) return;
  TORCH_CHECK(dropped->sym_sizes() == x.sym_sizes() && keep->sym_sizes() == x.sym_sizes(),
              message("dropped and keep must have x's shape ", sizes_text(x.sym_sizes()), ", got ",
                      sizes_text(dropped->sym_sizes()), " and ", sizes_text(keep->sym_sizes())));
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) &&
                  (keep->scalar_type() == at::kBool || keep->scalar_type() == x.scalar_type()),
              message("keep must be bool (a dropout mask) or x's floating dtype (dropout's noise); got x ",
                      x.scalar_type(), ", keep ", keep->scalar_type()));
  TORCH_CHECK(dropped->device() == x.device() && keep->device() == x.device(),
              message("x, dropped and keep must be on one device, got ", x.device(), ", ", dropped->device(), ", ",
                      keep->device()));
}

}  // namespace lowrank
