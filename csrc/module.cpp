// Makes ranet_fast._C importable as a Python module. Importing it runs the
// static TORCH_LIBRARY_FRAGMENT/TORCH_LIBRARY_IMPL registrations of every op
// compiled into the shared library; the module itself only reports how it was
// built (WITH_CUDA, TORCH_VERSION, BUILD_INFO).
#include <Python.h>

// RANET_FAST_BUILT_WITH_TORCH: the torch version this library is built against,
// written by setup.py into build/generated.
#include "ranet_fast_build_info.h"

extern "C" {

// The same version as a marker in the library's bytes: ranet_fast/_extension.py
// searches the file for it when importing _C fails (e.g. an undefined symbol
// after torch changed), to say which torch the library was built for. Exported
// and used below, so the linker keeps it.
__attribute__((visibility("default"), used)) const char ranet_fast_build_info[] =
    "ranet_fast build info: torch=" RANET_FAST_BUILT_WITH_TORCH ";";

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", // name
      "Registers the ranet_fast::* operators with torch.library.", // doc
      -1, // no per-interpreter state
      nullptr, // no methods
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
#ifdef WITH_CUDA
  const long built_with_cuda = 1;
#else
  const long built_with_cuda = 0;
#endif
  if (PyModule_AddIntConstant(module, "WITH_CUDA", built_with_cuda) != 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", RANET_FAST_BUILT_WITH_TORCH) != 0 ||
      PyModule_AddStringConstant(module, "BUILD_INFO", ranet_fast_build_info) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

} // extern "C"
