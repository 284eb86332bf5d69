// CUDA kernels of ranet_fast::upsample_concat{,_out,_backward}. All parts of
// one call are described in a kernel-argument struct (up to kMaxPartsPerLaunch
// of them; more are processed in chunks) and one grid-stride launch covers the
// output elements of every part (forward) or the gradient elements of every
// part (backward, gather form: each thread sums the output-gradient elements
// that read its input element, so there are no atomics and the result is
// deterministic).
#include "../upsample_concat.h"
#include "../upsample_concat_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = upsample_concat_math;

constexpr int kMaxPartsPerLaunch = 8;
constexpr int kThreadsPerBlock = 256;
// Grid-stride loops cover larger problems; this many blocks fill any current GPU.
constexpr int64_t kMaxBlocks = 65536;

template <typename scalar_t, typename acc_t>
struct ForwardPart {
  const scalar_t* data;
  int64_t channels;
  int64_t in_h;
  int64_t in_w;
  int64_t stride_n;
  int64_t stride_c;
  int64_t stride_h;
  int64_t stride_w;
  int64_t channel_offset;
  int64_t first_element;  // index of the part's first element in the launch
  acc_t scale_h;
  acc_t scale_w;
  bool identity;
};

template <typename scalar_t, typename acc_t>
struct ForwardLaunch {
  ForwardPart<scalar_t, acc_t> parts[kMaxPartsPerLaunch];
  int num_parts;
  int64_t num_elements;
};

struct OutputGeometry {
  int64_t out_h;
  int64_t out_w;
  int64_t stride_n;
  int64_t stride_c;
  int64_t stride_h;
  int64_t stride_w;
  // Enumerate each part's elements channel-fastest (channels_last outputs) so
  // that neighbouring threads write neighbouring addresses.
  bool channels_innermost;
};

template <typename Part>
__device__ int find_part(const Part* parts, int num_parts, int64_t element) {
  int part = 0;
  while (part + 1 < num_parts && parts[part + 1].first_element <= element) {
    ++part;
  }
  return part;
}

template <typename scalar_t, typename acc_t>
__global__ void upsample_concat_forward_kernel(
    scalar_t* __restrict__ out,
    OutputGeometry geometry,
    ForwardLaunch<scalar_t, acc_t> launch) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t element = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       element < launch.num_elements;
       element += step) {
    const ForwardPart<scalar_t, acc_t>& part =
        launch.parts[find_part(launch.parts, launch.num_parts, element)];
    const int64_t local = element - part.first_element;
    int64_t n, c, h, w;
    if (geometry.channels_innermost) {
      c = local % part.channels;
      w = (local / part.channels) % geometry.out_w;
      h = (local / part.channels / geometry.out_w) % geometry.out_h;
      n = local / part.channels / geometry.out_w / geometry.out_h;
    } else {
      w = local % geometry.out_w;
      h = (local / geometry.out_w) % geometry.out_h;
      c = (local / geometry.out_w / geometry.out_h) % part.channels;
      n = local / geometry.out_w / geometry.out_h / part.channels;
    }
    const scalar_t* plane = part.data + n * part.stride_n + c * part.stride_c;
    scalar_t value;
    if (part.identity) {
      value = plane[h * part.stride_h + w * part.stride_w];
    } else {
      value = static_cast<scalar_t>(math::bilinear_value<scalar_t, acc_t>(
          plane,
          part.stride_h,
          part.stride_w,
          math::linear_taps(part.scale_h, h, part.in_h),
          math::linear_taps(part.scale_w, w, part.in_w)));
    }
    out[n * geometry.stride_n + (part.channel_offset + c) * geometry.stride_c +
        h * geometry.stride_h + w * geometry.stride_w] = value;
  }
}

unsigned blocks_for(int64_t num_elements) {
  return static_cast<unsigned>(std::min<int64_t>(
      kMaxBlocks, (num_elements + kThreadsPerBlock - 1) / kThreadsPerBlock));
}

void upsample_concat_write(const at::Tensor& out, at::TensorList parts, at::IntArrayRef channel_offsets) {
  const c10::cuda::CUDAGuard device_guard(out.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  OutputGeometry geometry{
      out.size(2),
      out.size(3),
      out.stride(0),
      out.stride(1),
      out.stride(2),
      out.stride(3),
      out.stride(1) < out.stride(3)};
  const int64_t batch = out.size(0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, out.scalar_type(), "upsample_concat_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        for (size_t chunk = 0; chunk < parts.size(); chunk += kMaxPartsPerLaunch) {
          ForwardLaunch<scalar_t, acc_t> launch{};
          launch.num_parts = static_cast<int>(
              std::min<size_t>(kMaxPartsPerLaunch, parts.size() - chunk));
          int64_t num_elements = 0;
          for (int j = 0; j < launch.num_parts; ++j) {
            const at::Tensor& part = parts[chunk + j];
            ForwardPart<scalar_t, acc_t>& described = launch.parts[j];
            described.data = part.const_data_ptr<scalar_t>();
            described.channels = part.size(1);
            described.in_h = part.size(2);
            described.in_w = part.size(3);
            described.stride_n = part.stride(0);
            described.stride_c = part.stride(1);
            described.stride_h = part.stride(2);
            described.stride_w = part.stride(3);
            described.channel_offset = channel_offsets[chunk + j];
            described.first_element = num_elements;
            described.scale_h = math::source_scale<acc_t>(part.size(2), geometry.out_h);
            described.scale_w = math::source_scale<acc_t>(part.size(3), geometry.out_w);
            described.identity = math::resize_is_identity(
                part.size(2), part.size(3), geometry.out_h, geometry.out_w);
            num_elements += batch * part.size(1) * geometry.out_h * geometry.out_w;
          }
          launch.num_elements = num_elements;
          upsample_concat_forward_kernel<scalar_t, acc_t>
              <<<blocks_for(num_elements), kThreadsPerBlock, 0, stream>>>(
                  out.mutable_data_ptr<scalar_t>(), geometry, launch);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

template <typename scalar_t, typename acc_t>
struct BackwardPart {
  // [N, channels, in_h, in_w], contiguous or channels_last as
  // OutputGeometry::channels_innermost says.
  scalar_t* gradient;
  int64_t channels;
  int64_t in_h;
  int64_t in_w;
  int64_t channel_offset;
  int64_t first_element;
  acc_t scale_h;
  acc_t scale_w;
  bool identity;
};

template <typename scalar_t, typename acc_t>
struct BackwardLaunch {
  BackwardPart<scalar_t, acc_t> parts[kMaxPartsPerLaunch];
  int num_parts;
  int64_t num_elements;
};

template <typename scalar_t, typename acc_t>
__global__ void upsample_concat_backward_kernel(
    const scalar_t* __restrict__ grad_output,
    OutputGeometry geometry,
    BackwardLaunch<scalar_t, acc_t> launch) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t element = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       element < launch.num_elements;
       element += step) {
    const BackwardPart<scalar_t, acc_t>& part =
        launch.parts[find_part(launch.parts, launch.num_parts, element)];
    const int64_t local = element - part.first_element;
    // The gradient is dense in this enumeration order, so `local` is also
    // the element's offset in it.
    int64_t n, c, y, x;
    if (geometry.channels_innermost) {
      c = local % part.channels;
      x = (local / part.channels) % part.in_w;
      y = (local / part.channels / part.in_w) % part.in_h;
      n = local / part.channels / part.in_w / part.in_h;
    } else {
      x = local % part.in_w;
      y = (local / part.in_w) % part.in_h;
      c = (local / part.in_w / part.in_h) % part.channels;
      n = local / part.in_w / part.in_h / part.channels;
    }
    const scalar_t* grad_plane =
        grad_output + n * geometry.stride_n + (part.channel_offset + c) * geometry.stride_c;
    if (part.identity) {
      part.gradient[local] = grad_plane[y * geometry.stride_h + x * geometry.stride_w];
    } else {
      part.gradient[local] = static_cast<scalar_t>(math::bilinear_input_gradient<scalar_t, acc_t>(
          grad_plane,
          geometry.stride_h,
          geometry.stride_w,
          y,
          x,
          part.in_h,
          part.in_w,
          geometry.out_h,
          geometry.out_w,
          part.scale_h,
          part.scale_w));
    }
  }
}

void upsample_concat_write_gradients(
    const at::Tensor& grad_output,
    at::IntArrayRef channel_offsets,
    const std::vector<at::Tensor>& gradients) {
  const c10::cuda::CUDAGuard device_guard(grad_output.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  OutputGeometry geometry{
      grad_output.size(2),
      grad_output.size(3),
      grad_output.stride(0),
      grad_output.stride(1),
      grad_output.stride(2),
      grad_output.stride(3),
      upsample_concat_gradients_channels_last(grad_output)};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad_output.scalar_type(), "upsample_concat_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        for (size_t chunk = 0; chunk < gradients.size(); chunk += kMaxPartsPerLaunch) {
          BackwardLaunch<scalar_t, acc_t> launch{};
          launch.num_parts = static_cast<int>(
              std::min<size_t>(kMaxPartsPerLaunch, gradients.size() - chunk));
          int64_t num_elements = 0;
          for (int j = 0; j < launch.num_parts; ++j) {
            const at::Tensor& gradient = gradients[chunk + j];
            BackwardPart<scalar_t, acc_t>& described = launch.parts[j];
            described.gradient = gradient.mutable_data_ptr<scalar_t>();
            described.channels = gradient.size(1);
            described.in_h = gradient.size(2);
            described.in_w = gradient.size(3);
            described.channel_offset = channel_offsets[chunk + j];
            described.first_element = num_elements;
            described.scale_h = math::source_scale<acc_t>(gradient.size(2), geometry.out_h);
            described.scale_w = math::source_scale<acc_t>(gradient.size(3), geometry.out_w);
            described.identity = math::resize_is_identity(
                gradient.size(2), gradient.size(3), geometry.out_h, geometry.out_w);
            num_elements += gradient.numel();
          }
          launch.num_elements = num_elements;
          upsample_concat_backward_kernel<scalar_t, acc_t>
              <<<blocks_for(num_elements), kThreadsPerBlock, 0, stream>>>(
                  grad_output.const_data_ptr<scalar_t>(), geometry, launch);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  register_upsample_concat_kernels<upsample_concat_write, upsample_concat_write_gradients>(m);
}

} // namespace ranet_fast::ops
