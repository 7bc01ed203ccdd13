// Schemas of every fastprox operator, defined once. Kernels register per device:
// csrc/cpu/*.cpp (CPU), kernels/*.py (CUDA). Fake (meta) implementations live in
// fastprox/_registry.py; the math contract is ../shared/SPEC.md and fastprox/ops.py.
//
// Mutating ops take the weight as Tensor(a!) and return nothing (a custom op may not return
// its mutated input); the Python wrappers return the weight. Thresholds travel as 0-d tensors
// so that changing them under torch.compile does not recompile the graph.
#include <Python.h>

#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

TORCH_LIBRARY(fastprox, m) {
  m.def("group_norms(Tensor weight, int[] dim) -> Tensor");
  m.def("group_shrink_(Tensor(a!) weight, Tensor lam, int[] dim, bool size_weighted) -> ()");
  m.def("soft_threshold_(Tensor(a!) weight, Tensor lam) -> ()");
  m.def(
      "sparse_group_shrink_(Tensor(a!) weight, Tensor lam_l1, Tensor lam_group, int[] dim, "
      "bool size_weighted) -> ()");
  m.def("exclusive_shrink_(Tensor(a!) weight, Tensor lam, int[] dim, bool exact) -> ()");
  m.def(
      "cges_shrink_(Tensor(a!) weight, Tensor lam_group, Tensor lam_exclusive, int[] dim, "
      "bool size_weighted, bool exact) -> ()");
}

// The proximal steps have no derivative. Without these fallbacks an in-place call on a non-leaf
// tensor that requires grad would leave a stale grad_fn behind (silently wrong gradients); with
// them it behaves like a torch in-place op without a formula: the leaf error, a bumped version
// counter, and "derivative ... not implemented" on backward. group_norms gets a real backward
// in Python (torch.library.register_autograd), which takes precedence over the fallback.
static const char* const kMutatingOps[] = {
    "group_shrink_", "soft_threshold_", "sparse_group_shrink_", "exclusive_shrink_", "cges_shrink_"};

TORCH_LIBRARY_IMPL(fastprox, Autograd, m) {
  for (const char* op : kMutatingOps) m.impl(op, torch::autograd::autogradNotImplementedFallback());
}
TORCH_LIBRARY_IMPL(fastprox, ADInplaceOrView, m) {
  for (const char* op : kMutatingOps) {
    m.impl(op, torch::autograd::autogradNotImplementedInplaceOrViewFallback());
  }
}

// A Python module only so that `import fastprox._C` loads the library and runs the registrations
// above. It also records the instruction set the kernels were compiled for.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "cpu_capability", FASTPROX_CPU_CAPABILITY) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
