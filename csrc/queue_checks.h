// Argument checks shared by the CPU and CUDA implementations of fastswav::queue_push_.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace fastswav {

// Checks what can be checked without reading device memory (so no host sync on CUDA).
inline void check_queue_push_args(const at::Tensor& buffer, const at::Tensor& write_pos,
                                  const at::Tensor& filled, const at::Tensor& new_rows) {
  TORCH_CHECK(buffer.dim() == 3, "queue_push_: buffer must be [A, L, D], got ", buffer.sizes());
  TORCH_CHECK(buffer.is_contiguous(), "queue_push_: buffer must be contiguous");
  TORCH_CHECK(new_rows.dim() == 3 && new_rows.size(0) == buffer.size(0) &&
                  new_rows.size(2) == buffer.size(2),
              "queue_push_: new rows must be [", buffer.size(0), ", B, ", buffer.size(2),
              "], got ", new_rows.sizes());
  TORCH_CHECK(new_rows.size(1) <= buffer.size(1), "queue_push_: cannot push ", new_rows.size(1),
              " rows into a queue of length ", buffer.size(1));
  TORCH_CHECK(buffer.size(1) > 0, "queue_push_: queue length must be positive");
  TORCH_CHECK(write_pos.scalar_type() == at::kLong && write_pos.numel() == 1,
              "queue_push_: write_pos must be a one-element int64 tensor");
  TORCH_CHECK(filled.scalar_type() == at::kLong && filled.numel() == 1,
              "queue_push_: filled must be a one-element int64 tensor");
  const auto device = buffer.device();
  TORCH_CHECK(write_pos.device() == device && filled.device() == device &&
                  new_rows.device() == device,
              "queue_push_: buffer, write_pos, filled and new must be on one device");
}

}  // namespace fastswav
