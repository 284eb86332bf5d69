// CUDA kernel of ranet_fast::gather_rows: one launch copies the selected rows
// of up to kMaxTensorsPerLaunch tensors (longer lists take one launch per
// kMaxTensorsPerLaunch tensors).
//
// The tensors are described by value in the kernel's argument struct (no
// host-to-device copy of a descriptor table; 64 descriptors fit the classic
// 4 KiB parameter limit). Their rows are cut into work items by
// gather_rows_math (the plan the CPU kernel also uses, so the CPU tests cover
// this arithmetic): each block takes one item at a time (grid-stride), finds
// its tensor by binary search over the descriptors' first items, and its 256
// threads copy the item's units (at most 1024; 16, 8, 4, 2 or 1 bytes each,
// the widest the tensor's addresses and lengths allow). The gather indices
// are read on the device; check_index=True costs one synchronisation (the
// index range is copied to the host and checked before the launch).
#include "../gather_rows.h"
#include "../gather_rows_math.h"

#include <ATen/ops/aminmax.h>
#include <ATen/ops/stack.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace ranet_fast::ops {

namespace {

namespace math = gather_rows_math;

constexpr int kMaxTensorsPerLaunch = 64;
constexpr int kThreadsPerBlock = 256;
static_assert(math::kUnitsPerItem % kThreadsPerBlock == 0, "an item is a whole number of block strides");
// Grid-stride loops cover larger problems; this many blocks fill any current GPU.
constexpr int64_t kMaxBlocks = 65536;

struct TensorCopy {
  const char* src;
  char* dst;
  int64_t src_stride_bytes;
  int64_t units_per_row;
  int64_t chunks_per_row;
  int64_t first_item;
  int32_t rows_per_item;
  int32_t unit_bytes;
};

struct GatherLaunch {
  TensorCopy tensors[kMaxTensorsPerLaunch];
  const int64_t* index;
  int64_t rows_in;
  int64_t rows_out;
  int64_t num_items;
  int num_tensors;
};
static_assert(sizeof(GatherLaunch) <= 4096, "kernel arguments must fit 4 KiB");

// Copies the item's units as Unit-sized loads and stores: units
// [unit_begin, unit_end) of rows [row_begin, row_end), threads striding over
// (row, unit) pairs row-major so that neighbouring threads touch neighbouring
// addresses.
template <typename Unit>
__device__ void copy_item(
    const TensorCopy& copy,
    const math::ItemExtent& extent,
    const int64_t* __restrict__ index,
    int64_t rows_in) {
  // An item holds at most kUnitsPerItem units, so 32-bit arithmetic suffices.
  const int width = static_cast<int>(extent.unit_end - extent.unit_begin);
  const int count = static_cast<int>(extent.row_end - extent.row_begin) * width;
  const int64_t row_bytes = copy.units_per_row * static_cast<int64_t>(sizeof(Unit));
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const int local_row = i / width;
    const int64_t row = extent.row_begin + local_row;
    const int64_t unit = extent.unit_begin + (i - local_row * width);
    const int64_t source_row = index[row];
    CUDA_KERNEL_ASSERT(math::index_in_range(source_row, rows_in));
    const Unit* src = reinterpret_cast<const Unit*>(
        copy.src + math::source_offset(source_row, copy.src_stride_bytes, unit, sizeof(Unit)));
    Unit* dst = reinterpret_cast<Unit*>(copy.dst + math::destination_offset(row, row_bytes, unit, sizeof(Unit)));
    *dst = __ldg(src);
  }
}

// __grid_constant__: the blocks index the descriptor array with a runtime
// value and take references into it; without the qualifier that would make
// every thread copy the whole 3.6 KiB struct to local memory.
__global__ void __launch_bounds__(kThreadsPerBlock) gather_rows_kernel(const __grid_constant__ GatherLaunch launch) {
  for (int64_t item = blockIdx.x; item < launch.num_items; item += gridDim.x) {
    const TensorCopy& copy = launch.tensors[math::find_tensor(launch.tensors, launch.num_tensors, item)];
    const math::RowPlan plan{copy.unit_bytes, copy.units_per_row, copy.rows_per_item, copy.chunks_per_row, 0};
    const math::ItemExtent extent =
        math::item_extent(plan, item - copy.first_item, launch.rows_out, math::kUnitsPerItem);
    switch (copy.unit_bytes) {
      case 16:
        copy_item<uint4>(copy, extent, launch.index, launch.rows_in);
        break;
      case 8:
        copy_item<uint2>(copy, extent, launch.index, launch.rows_in);
        break;
      case 4:
        copy_item<uint32_t>(copy, extent, launch.index, launch.rows_in);
        break;
      case 2:
        copy_item<uint16_t>(copy, extent, launch.index, launch.rows_in);
        break;
      default:
        copy_item<uint8_t>(copy, extent, launch.index, launch.rows_in);
        break;
    }
  }
}

// Raises IndexError unless every index value is in [0, rows_in). One
// device-to-host copy of (min, max), hence one synchronisation.
void check_index_range_cuda(const at::Tensor& index, int64_t rows_in) {
  if (index.numel() == 0) {
    return;
  }
  auto [low, high] = at::aminmax(index);
  const at::Tensor range = at::stack({low, high}).cpu();
  const int64_t* bounds = range.const_data_ptr<int64_t>();
  TORCH_CHECK_INDEX(
      math::index_in_range(bounds[0], rows_in) && math::index_in_range(bounds[1], rows_in),
      "ranet_fast::gather_rows: index values range over [",
      bounds[0],
      ", ",
      bounds[1],
      "] but must lie in [0, ",
      rows_in,
      ") for tensors of ",
      rows_in,
      " rows");
}

std::vector<at::Tensor> gather_rows_cuda(at::TensorList tensors, const at::Tensor& index, bool check_index) {
  check_gather_rows_args(tensors, index);
  const c10::cuda::CUDAGuard device_guard(index.device());
  const at::Tensor contiguous_index = index.contiguous();
  const int64_t rows_in = tensors[0].size(0);
  const int64_t rows_out = contiguous_index.numel();
  // Without rows no index is valid; checked even when check_index is false,
  // since it needs no synchronisation.
  TORCH_CHECK_INDEX(
      rows_in > 0 || rows_out == 0,
      "ranet_fast::gather_rows: index has ",
      rows_out,
      " entries but the tensors have no rows");
  if (check_index) {
    check_index_range_cuda(contiguous_index, rows_in);
  }
  std::vector<at::Tensor> outputs = allocate_gather_rows_outputs(tensors, rows_out);
  if (rows_out == 0) {
    return outputs;
  }
  // Keeps the row-dense copies of non-row-dense inputs alive until the
  // launches are queued (the caching allocator orders their reuse on the stream).
  std::vector<at::Tensor> sources;
  sources.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    sources.push_back(make_row_dense(t));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t chunk = 0; chunk < tensors.size(); chunk += kMaxTensorsPerLaunch) {
    GatherLaunch launch{};
    launch.index = contiguous_index.const_data_ptr<int64_t>();
    launch.rows_in = rows_in;
    launch.rows_out = rows_out;
    int64_t num_items = 0;
    int num_tensors = 0;
    const size_t end = std::min(tensors.size(), chunk + kMaxTensorsPerLaunch);
    for (size_t i = chunk; i < end; ++i) {
      const RowCopyPlan copy = plan_row_copy(sources[i], outputs[i], rows_in, rows_out);
      const math::RowPlan& plan = copy.plan;
      if (plan.num_items == 0) {
        continue;  // empty rows: nothing to copy
      }
      launch.tensors[num_tensors++] = TensorCopy{
          copy.src,
          copy.dst,
          copy.src_stride_bytes,
          plan.units_per_row,
          plan.chunks_per_row,
          num_items,
          static_cast<int32_t>(plan.rows_per_item),
          static_cast<int32_t>(plan.unit_bytes)};
      num_items += plan.num_items;
    }
    if (num_items == 0) {
      continue;
    }
    launch.num_tensors = num_tensors;
    launch.num_items = num_items;
    const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, num_items));
    gather_rows_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(launch);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return outputs;
}

} // namespace

TORCH_LIBRARY_IMPL(ranet_fast, CUDA, m) {
  m.impl("gather_rows", &gather_rows_cuda);
}

} // namespace ranet_fast::ops
