// Schemas of every fastprox operator, defined once. Kernels register per device:
// csrc/cpu/*.cpp (CPU), kernels/*.py (CUDA). Fake (meta) implementations live in
// fastprox/_registry.py; the math contract is ../shared/SPEC.md and fastprox/ops.py.
//
// Mutating ops take the weight as Tensor(a!) and return nothing (a custom op may not return
// its mutated input); the Python wrappers return the weight. Thresholds travel as 0-d tensors
// so that changing them under torch.compile does not recompile the graph.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
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
  // One step per tensor of a list (per tensor: lams[i] = (lam_l1, lam_group, lam_exclusive);
  // its reduced dims are the next dim_counts[i] entries of dims). csrc/cpu/foreach_prox.cpp.
  m.def(
      "foreach_prox_(Tensor(a!)[] weights, Tensor lams, int[] dims, int[] dim_counts, "
      "bool[] size_weighted, bool[] exact) -> ()");
}

// In-place ops bump the version counter of what they mutate, so that autograd notices a weight
// changed after it was saved for backward (torch's stock fallback bumps only aliased returns, and
// these ops return nothing). The Python API refuses tensors that need grad in grad mode
// (fastprox/_checks.py: the proximal steps have no derivative).
static void bump_mutated_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                  torch::jit::Stack* stack) {
  const auto& arguments = op.schema().arguments();
  std::vector<at::Tensor> mutated;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    const auto& value = (*stack)[stack->size() - arguments.size() + i];
    if (alias == nullptr || !alias->isWrite()) continue;
    if (value.isTensor()) mutated.push_back(value.toTensor());
    if (value.isTensorList()) {
      for (const at::Tensor& t : value.toTensorVector()) mutated.push_back(t);
    }
  }
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : mutated) torch::autograd::impl::bump_version(t);
}

TORCH_LIBRARY_IMPL(fastprox, ADInplaceOrView, m) {
  for (const char* op : {"group_shrink_", "soft_threshold_", "sparse_group_shrink_",
                         "exclusive_shrink_", "cges_shrink_", "foreach_prox_"}) {
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&bump_mutated_versions>());
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
