// Makes ranet_fast._C importable as a Python module. Importing it runs the
// static TORCH_LIBRARY_FRAGMENT/TORCH_LIBRARY_IMPL registrations of every op
// compiled into the shared library; the module itself only reports how it was
// built.
#include <Python.h>

extern "C" {

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
  if (PyModule_AddIntConstant(module, "WITH_CUDA", built_with_cuda) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

} // extern "C"
