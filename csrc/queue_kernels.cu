// CUDA kernel of fastswav::queue_push_ (schema and CPU kernel in queue_ops.cpp).
//
// The write position is read on the device, so a push never syncs with the host and can be
// captured in a CUDA graph. Two launches on the current stream: the copy reads write_pos,
// and only afterwards (stream order) a one-thread launch advances write_pos and filled; a
// single launch could not advance them without racing the blocks still reading them.
#include <algorithm>
#include <cstdint>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "queue_checks.h"

namespace fastswav {
namespace {

// Copies rows as words of type Word (16, 8, 4, 2 or 1 bytes): after the dtype cast the
// update is a byte copy, so fp32, fp16 and bf16 share one kernel per word size.
template <typename Word>
__global__ void ring_write_kernel(Word* __restrict__ buffer, const Word* __restrict__ rows,
                                  const int64_t* __restrict__ write_pos, int64_t length,
                                  int64_t batch, int64_t words_per_row, int64_t total_words) {
  const int64_t pos = ((*write_pos % length) + length) % length;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total_words;
       i += stride) {
    const int64_t row = i / words_per_row;  // row of rows: a * batch + b
    const int64_t word = i - row * words_per_row;
    const int64_t a = row / batch;
    const int64_t b = row - a * batch;
    int64_t slot = pos + b;  // < 2 * length, so one subtraction is the remainder
    if (slot >= length) slot -= length;
    buffer[(a * length + slot) * words_per_row + word] = rows[i];
  }
}

__global__ void ring_advance_kernel(int64_t* write_pos, int64_t* filled, int64_t length,
                                    int64_t batch) {
  const int64_t pos = ((*write_pos % length) + length) % length;
  *write_pos = (pos + batch) % length;
  const int64_t count = *filled + batch;
  *filled = count < length ? count : length;
}

template <typename Word>
void launch_ring_write(void* buffer, const void* rows, const int64_t* write_pos, int64_t n_assign,
                       int64_t length, int64_t batch, int64_t row_bytes, cudaStream_t stream) {
  const int64_t words_per_row = row_bytes / static_cast<int64_t>(sizeof(Word));
  const int64_t total_words = n_assign * batch * words_per_row;
  if (total_words == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((total_words + threads - 1) / threads, 65535);
  ring_write_kernel<Word><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      static_cast<Word*>(buffer), static_cast<const Word*>(rows), write_pos, length, batch,
      words_per_row, total_words);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void queue_push_cuda(at::Tensor& buffer, at::Tensor& write_pos, at::Tensor& filled,
                     const at::Tensor& new_rows) {
  check_queue_push_args(buffer, write_pos, filled, new_rows);
  const c10::cuda::CUDAGuard device_guard(buffer.device());
  const at::Tensor rows = new_rows.to(buffer.scalar_type()).contiguous();
  const int64_t n_assign = buffer.size(0), length = buffer.size(1), batch = rows.size(1);
  const int64_t row_bytes = buffer.size(2) * static_cast<int64_t>(buffer.element_size());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  // Widest word that divides the row and both base addresses (vectorised 16-byte copies
  // for D=128 in any of the three dtypes).
  const auto dst_addr = reinterpret_cast<std::uintptr_t>(buffer.data_ptr());
  const auto src_addr = reinterpret_cast<std::uintptr_t>(rows.data_ptr());
  const std::uintptr_t misalign = static_cast<std::uintptr_t>(row_bytes) | dst_addr | src_addr;
  const int64_t* pos_ptr = write_pos.data_ptr<int64_t>();
  if (misalign % 16 == 0) {
    launch_ring_write<uint4>(buffer.data_ptr(), rows.data_ptr(), pos_ptr, n_assign, length, batch,
                             row_bytes, stream);
  } else if (misalign % 8 == 0) {
    launch_ring_write<uint2>(buffer.data_ptr(), rows.data_ptr(), pos_ptr, n_assign, length, batch,
                             row_bytes, stream);
  } else if (misalign % 4 == 0) {
    launch_ring_write<uint32_t>(buffer.data_ptr(), rows.data_ptr(), pos_ptr, n_assign, length,
                                batch, row_bytes, stream);
  } else if (misalign % 2 == 0) {
    launch_ring_write<uint16_t>(buffer.data_ptr(), rows.data_ptr(), pos_ptr, n_assign, length,
                                batch, row_bytes, stream);
  } else {
    launch_ring_write<uint8_t>(buffer.data_ptr(), rows.data_ptr(), pos_ptr, n_assign, length,
                               batch, row_bytes, stream);
  }
  ring_advance_kernel<<<1, 1, 0, stream>>>(write_pos.data_ptr<int64_t>(),
                                           filled.data_ptr<int64_t>(), length, batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastswav, CUDA, m) {
  m.impl("queue_push_", &queue_push_cuda);
}

}  // namespace fastswav
