// CPU kernels of ranet_fast::fused_conv2d{,_out}.
//
// The convolution itself is ATen's (oneDNN where available): a hand-written
// CPU conv would be slower. Around it, each elementwise stage is one fused,
// parallel pass over plain pointers:
//
// - prologue (BN -> activation before the conv): act(x * scale + shift) into a
//   dense tensor of x's layout, which is what the conv reads (the zero padding
//   is the conv's own, so it stays zero);
// - epilogue: act(scale * conv + shift) from the conv result straight into
//   the output's channel slice, any strides: the result is never written to a
//   separate normalised tensor, and a dense block's buffer receives a layer's
//   channels in place. Without out= the epilogue runs in place on the conv's
//   result when that already has the output's layout (it usually does).
//
// A 1x1, stride-1 conv without a prologue is a matrix product whose operand is
// the input as it lies in memory, even when x is a channel prefix of a bigger
// NCHW or channels_last buffer (the other channels only widen the leading
// dimension). It runs as one GEMM on that strided view instead of
// at::convolution, which would first copy the non-contiguous input.
#include "../fused_conv2d.h"
#include "../fused_conv2d_math.h"
#include "../layout.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/bmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = fused_conv2d_math;

// Elements per parallel task (ATen's elementwise grain size).
constexpr int64_t kElementsPerTask = 32768;

// Calls body(std::integral_constant<math::Activation, kind>{}) for the kind
// given at run time: the inner loops are compiled once per activation, so
// none of them branches on it per element (and the unit-stride ones vectorise).
template <typename Body>
void with_activation(math::Activation kind, const Body& body) {
  using math::Activation;
  switch (kind) {
    case Activation::kRelu:
      return body(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kRelu6:
      return body(std::integral_constant<Activation, Activation::kRelu6>{});
    case Activation::kSilu:
      return body(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kGelu:
      return body(std::integral_constant<Activation, Activation::kGelu>{});
    case Activation::kHardswish:
      return body(std::integral_constant<Activation, Activation::kHardswish>{});
    case Activation::kLeakyRelu:
      return body(std::integral_constant<Activation, Activation::kLeakyRelu>{});
    default:
      return body(std::integral_constant<Activation, Activation::kNone>{});
  }
}

// dst[n, c, h, w] = apply_affine(affine_of(c), src[n, c, h, w]) over the
// [N, C, H, W] index space of src; dst may be src itself (in place). The
// loops follow dst's layout: whole rows with channels innermost when dst's
// channels are (channels_last), else whole planes. The per-channel maps are
// copied into local storage first, so that stores into dst cannot change them
// and the unit-stride inner loops vectorise. The activation and its slope are
// the same for every channel of a prologue or an epilogue: channel 0's.
template <typename scalar_t, typename acc_t, typename AffineOf>
void per_channel_map(const at::Tensor& src, const at::Tensor& dst, const AffineOf& affine_of) {
  const int64_t batch = src.size(0), channels = src.size(1), height = src.size(2), width = src.size(3);
  const scalar_t* in = src.const_data_ptr<scalar_t>();
  scalar_t* out = dst.mutable_data_ptr<scalar_t>();
  const Strides4 si = strides_of(src), so = strides_of(dst);
  const math::ChannelAffine<acc_t> first_channel = affine_of(0);
  const acc_t negative_slope = first_channel.negative_slope;
  if (channels > 1 && so.c == 1) {
    // Scales and shifts as two arrays, so the unit-stride loop over channels vectorises.
    std::vector<acc_t> scales(channels), shifts(channels);
    for (int64_t c = 0; c < channels; ++c) {
      const math::ChannelAffine<acc_t> map = affine_of(c);
      scales[c] = map.scale;
      shifts[c] = map.shift;
    }
    const acc_t* scale = scales.data();
    const acc_t* shift = shifts.data();
    const int64_t row = width * channels;
    with_activation(first_channel.activation, [&](auto kind) {
      at::parallel_for(0, batch * height, std::max<int64_t>(1, kElementsPerTask / row), [&](int64_t first, int64_t last) {
        for (int64_t unit = first; unit < last; ++unit) {
          const int64_t n = unit / height, h = unit % height;
          for (int64_t w = 0; w < width; ++w) {
            const scalar_t* in_pixel = in + n * si.n + h * si.h + w * si.w;
            scalar_t* out_pixel = out + n * so.n + h * so.h + w * so.w;
            const int64_t in_step = si.c;
            for (int64_t c = 0; c < channels; ++c) {
              const acc_t mapped = static_cast<acc_t>(in_pixel[c * in_step]) * scale[c] + shift[c];
              out_pixel[c] = static_cast<scalar_t>(math::activate<decltype(kind)::value>(mapped, negative_slope));
            }
          }
        }
      });
    });
    return;
  }
  const int64_t plane = height * width;
  with_activation(first_channel.activation, [&](auto kind) {
    auto map = [negative_slope](const math::ChannelAffine<acc_t>& affine, scalar_t value) {
      return static_cast<scalar_t>(math::activate<decltype(kind)::value>(
          static_cast<acc_t>(value) * affine.scale + affine.shift, negative_slope));
    };
    at::parallel_for(0, batch * channels, std::max<int64_t>(1, kElementsPerTask / plane), [&](int64_t first, int64_t last) {
      for (int64_t unit = first; unit < last; ++unit) {
        const int64_t n = unit / channels, c = unit % channels;
        const math::ChannelAffine<acc_t> affine = affine_of(c);
        for (int64_t h = 0; h < height; ++h) {
          const scalar_t* in_line = in + n * si.n + c * si.c + h * si.h;
          scalar_t* out_line = out + n * so.n + c * so.c + h * so.h;
          if (si.w == 1 && so.w == 1) { // unit stride on both sides
            for (int64_t w = 0; w < width; ++w) {
              out_line[w] = map(affine, in_line[w]);
            }
          } else {
            for (int64_t w = 0; w < width; ++w) {
              out_line[w * so.w] = map(affine, in_line[w * si.w]);
            }
          }
        }
      }
    });
  });
}

template <typename acc_t>
const acc_t* optional_data(const c10::optional<at::Tensor>& vector) {
  return vector.has_value() ? vector->const_data_ptr<acc_t>() : nullptr;
}

at::Tensor apply_prologue(const FusedConv2dArgs& args) {
  const at::Tensor& x = args.x;
  at::Tensor activated = at::empty(
      x.sizes(),
      x.options().memory_format(
          fused_conv2d_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fused_conv2d_prologue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scale_data = args.prologue_scale->const_data_ptr<acc_t>();
    const acc_t* shift_data = args.prologue_shift->const_data_ptr<acc_t>();
    const auto slope = static_cast<acc_t>(args.negative_slope);
    per_channel_map<scalar_t, acc_t>(x, activated, [&](int64_t c) {
      return math::prologue_affine(scale_data, shift_data, c, args.prologue_activation, slope);
    });
  });
  return activated;
}

// A uniformly strided [rows, columns] matrix view of the 1x1 conv's input,
// or an undefined tensor when x's pixels are not uniformly strided.
// Channels innermost: rows are pixels (n, h, w), columns channels.
// Otherwise: one [Ci, H * W] matrix per sample (returned as [N, Ci, H * W]).
at::Tensor pointwise_matrix(const at::Tensor& x, bool channels_inner) {
  const int64_t batch = x.size(0), channels = x.size(1), height = x.size(2), width = x.size(3);
  if (channels_inner) {
    const int64_t pixel = x.stride(3);
    if (x.stride(2) != width * pixel || x.stride(0) != height * width * pixel) {
      return at::Tensor();
    }
    return x.as_strided({batch * height * width, channels}, {pixel, 1});
  }
  if (x.stride(3) != 1 || x.stride(2) != width) {
    return at::Tensor();
  }
  return x.as_strided({batch, channels, height * width}, {x.stride(0), x.stride(1), 1});
}

// conv2d(source, weight): a GEMM on the strided input for 1x1/stride-1
// convolutions, at::convolution otherwise. The result is [N, Co, Ho, Wo] in
// whatever dense layout the GEMM or conv produced (the epilogue reads any strides).
at::Tensor convolve(const at::Tensor& source, const at::Tensor& weight, int64_t stride, int64_t padding) {
  const int64_t kernel = weight.size(2);
  if (kernel == 1 && stride == 1 && padding == 0) {
    const int64_t batch = source.size(0), out_channels = weight.size(0);
    const int64_t height = source.size(2), width = source.size(3);
    const at::Tensor matrix_weight = weight.reshape({out_channels, weight.size(1)});
    const bool inner = channels_inner(source);
    const at::Tensor matrix = pointwise_matrix(source, inner);
    if (matrix.defined()) {
      if (inner) {
        // [N*H*W, Co] row-major is [N, Co, H, W] channels_last.
        return at::mm(matrix, matrix_weight.t())
            .as_strided({batch, out_channels, height, width},
                        {height * width * out_channels, 1, width * out_channels, out_channels});
      }
      // One batched GEMM over the strided per-sample matrices: at::matmul would fold the batch
      // into the rows and copy the transposed input first. The result is a dense [N, Co, H*W].
      return at::bmm(matrix_weight.expand({batch, out_channels, matrix_weight.size(1)}), matrix)
          .unflatten(2, {height, width});
    }
  }
  return at::convolution(source, weight, c10::nullopt, {stride, stride}, {padding, padding}, {1, 1}, false, {0, 0}, 1);
}

// conv2d(prologue(x), weight), before the epilogue.
at::Tensor conv_result(const FusedConv2dArgs& args) {
  if (args.prologue_scale.has_value()) {
    // The activated input is a dense tensor of our own, so at::convolution reads it without a
    // copy, and oneDNN's 1x1 kernels beat the GEMM on wide pre-activation layers (torchvision's
    // DenseNet-121 measured 0.82x eager with the GEMM, 1.04x with oneDNN).
    return at::convolution(apply_prologue(args),
                           args.weight.contiguous(), c10::nullopt, {args.stride, args.stride},
                           {args.padding, args.padding}, {1, 1}, false, {0, 0}, 1);
  }
  return convolve(args.x, args.weight.contiguous(), args.stride, args.padding);
}

// out = act(scale * conv + shift); out may be conv itself.
void apply_epilogue(const at::Tensor& conv, const at::Tensor& out, const FusedConv2dArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, conv.scalar_type(), "fused_conv2d_epilogue_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* scale_data = optional_data<acc_t>(args.epilogue_scale);
    const acc_t* shift_data = optional_data<acc_t>(args.epilogue_shift);
    const auto slope = static_cast<acc_t>(args.negative_slope);
    per_channel_map<scalar_t, acc_t>(conv, out, [&](int64_t c) {
      return math::epilogue_affine(scale_data, shift_data, c, args.activation, slope);
    });
  });
}

void fused_conv2d_write(const at::Tensor& out_slice, const FusedConv2dArgs& args) {
  if (out_slice.numel() == 0) {
    return;
  }
  apply_epilogue(conv_result(args), out_slice, args);
}

at::Tensor fused_conv2d_compute(const FusedConv2dArgs& args) {
  if (args.x.size(0) == 0) {
    return allocate_fused_conv2d_output(args);
  }
  // When the conv's own result already has the output's layout, the epilogue
  // runs on it in place: one allocation, as eager conv -> BN -> ReLU_ makes.
  const at::Tensor conv = conv_result(args);
  const bool in_place = conv.is_contiguous(
      fused_conv2d_channels_last(args.x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  at::Tensor out = in_place ? conv : allocate_fused_conv2d_output(args);
  apply_epilogue(conv, out, args);
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CPU, m) {
  register_fused_conv2d_kernels<fused_conv2d_compute, fused_conv2d_write>(m);
}

} // namespace ranet_fast::ops
