// Error messages of the extension, assembled from strings only.
//
// TORCH_CHECK(cond, a, b, c) formats its arguments through a string stream instantiated inside this
// extension. On a toolchain whose compiler and loaded libstdc++ disagree (seen on an H200 machine:
// torch 2.11 extensions built by /opt/gcc's g++), streaming a number that way crashed in the
// locale's num_put facet, so a bad argument turned into a segfault instead of a ValueError. Every
// check here passes ONE std::string made by sfg::msg (std::to_string for numbers, no streams),
// which c10 hands to the exception unformatted.
#pragma once

#include <torch/extension.h>

#include <string>
#include <type_traits>
#include <vector>

namespace sfg {
namespace detail {

inline void put(std::string& out, const char* s) { out += s; }
inline void put(std::string& out, const std::string& s) { out += s; }
inline void put(std::string& out, char c) { out.push_back(c); }
inline void put(std::string& out, bool v) { out += v ? "true" : "false"; }
inline void put(std::string& out, double v) { out += std::to_string(v); }
template <typename T, typename std::enable_if<std::is_integral<T>::value && !std::is_same<T, bool>::value &&
                                                  !std::is_same<T, char>::value,
                                              int>::type = 0>
inline void put(std::string& out, T v) {
  out += std::to_string(v);
}
inline void put(std::string& out, c10::IntArrayRef sizes) {
  out += '[';
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(sizes[i]);
  }
  out += ']';
}
inline void put(std::string& out, const std::vector<int64_t>& sizes) { put(out, c10::IntArrayRef(sizes)); }
inline void put(std::string& out, c10::ScalarType t) { out += c10::toString(t); }
inline void put(std::string& out, const c10::Device& d) { out += d.str(); }

}  // namespace detail

// The pieces concatenated: strings as they are, numbers by std::to_string, shapes as [a, b].
template <typename... Args>
std::string msg(const Args&... args) {
  std::string out;
  (detail::put(out, args), ...);
  return out;
}

}  // namespace sfg
