// Layout helpers shared by the kernels that index [N, C, H, W] tensors
// through their strides.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace ranet_fast::ops {

// A 4-D tensor's strides by dimension name; a plain struct, so that CUDA
// kernels take it by value.
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Whether t's channels are innermost in memory (channels_last, or a channel
// slice of it), so that loops run along channels.
inline bool channels_inner(const at::Tensor& t) {
  return t.size(1) > 1 && t.stride(1) == 1;
}

} // namespace ranet_fast::ops
