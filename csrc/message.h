// Error messages for TORCH_CHECK as one std::string, built without iostreams.
//
// Note: why not c10::str. TORCH_CHECK(cond, a, b, ...) streams its arguments into a
// std::ostringstream (c10::str), code inlined into this extension. On the H200 machines of this
// project (torch 2.11.0+cu130, the extension built there with g++ 13.3) a failing check whose
// message held a number crashed the process with a segmentation fault instead of raising, while a
// message that was one string raised normally (seen 2026-11-27 and 2026-11-28, docs/csrc.md); with
// torch 2.13 and g++ 12 here both raise. So every check with more than a literal passes one
// std::string made by lowrank::message, which appends numbers with std::to_string and names
// devices and dtypes with c10's own functions.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <type_traits>

namespace lowrank {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, c10::IntArrayRef v) {
  s += '[';
  for (size_t i = 0; i < v.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(v[i]);
  }
  s += ']';
}
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const caffe2::TypeMeta& v) { s += std::string(v.name()); }

// message("x has ", 3, " rows") == "x has 3 rows"
template <typename... Args>
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

}  // namespace lowrank
