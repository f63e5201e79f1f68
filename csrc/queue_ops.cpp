// fastswav::queue_push_: the feature queue's ring-buffer update, schema and CPU kernel.
//
// Writes new[a, b, :] at buffer[a, (write_pos + b) mod L, :], then advances write_pos mod L
// and sets filled = min(filled + B, L). The position lives in a tensor so that the CUDA
// kernel (queue_kernels.cu) reads it on the device: no host sync, capturable in a CUDA graph,
// and torch.compile sees no Python int that would change (and recompile) every step.
#include <Python.h>

#include <algorithm>
#include <cstring>

#include <torch/library.h>

#include "queue_checks.h"

namespace fastswav {
namespace {

void queue_push_cpu(at::Tensor& buffer, at::Tensor& write_pos, at::Tensor& filled,
                    const at::Tensor& new_rows) {
  check_queue_push_args(buffer, write_pos, filled, new_rows);
  // After the cast the update is a plain byte copy, so every dtype takes the same path.
  const at::Tensor rows = new_rows.to(buffer.scalar_type()).contiguous();
  const int64_t n_assign = buffer.size(0), length = buffer.size(1), batch = rows.size(1);
  const int64_t row_bytes = buffer.size(2) * static_cast<int64_t>(buffer.element_size());

  int64_t* pos_ptr = write_pos.data_ptr<int64_t>();
  int64_t* filled_ptr = filled.data_ptr<int64_t>();
  const int64_t pos = ((*pos_ptr % length) + length) % length;  // remainder, like the reference
  // Rows of one crop land in at most two contiguous runs: [pos, L) then [0, rest).
  const int64_t first = std::min(batch, length - pos);

  char* dst = static_cast<char*>(buffer.data_ptr());
  const char* src = static_cast<const char*>(rows.data_ptr());
  for (int64_t a = 0; a < n_assign; ++a) {
    char* dst_crop = dst + a * length * row_bytes;
    const char* src_crop = src + a * batch * row_bytes;
    std::memcpy(dst_crop + pos * row_bytes, src_crop, first * row_bytes);
    if (batch > first) {
      std::memcpy(dst_crop, src_crop + first * row_bytes, (batch - first) * row_bytes);
    }
  }
  *pos_ptr = (pos + batch) % length;
  *filled_ptr = std::min(*filled_ptr + batch, length);
}

}  // namespace

TORCH_LIBRARY(fastswav, m) {
  // The fake (meta) kernel for torch.compile is registered in Python; torch imports this
  // module when it needs it, even if nothing imported it before.
  m.set_python_module("fastswav.ops.queue_ext");
  m.def(
      "queue_push_(Tensor(a!) buffer, Tensor(b!) write_pos, Tensor(c!) filled, Tensor new) -> ()");
}

TORCH_LIBRARY_IMPL(fastswav, CPU, m) {
  m.impl("queue_push_", &queue_push_cpu);
}

}  // namespace fastswav

// A plain module so that `from fastswav import _C` loads the library and runs the
// registrations above; the ops themselves are reached through torch.ops.fastswav.
static PyModuleDef queue_module = {
    PyModuleDef_HEAD_INIT, "_C", "fastswav C++/CUDA ops (torch.ops.fastswav)", -1, nullptr,
};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&queue_module);
  if (module == nullptr) return nullptr;
#ifdef FASTSWAV_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
