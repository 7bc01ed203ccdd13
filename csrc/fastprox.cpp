// Schemas of fastprox's operators, defined once: group_norms, the fused in-place step
// foreach_prox_, of which the public in-place operators are presets (fastprox/ops.py), the step
// in an Adam metric foreach_metric_prox_ and its coupled form coupled_metric_prox_, and the
// phases (foreach_group_sums, foreach_group_sums_above, foreach_group_rewrite_) of steps whose
// groups span several tensors. Kernels register per device: csrc/cpu/*.cpp (CPU), kernels/*.py
// behind fastprox/_triton.py (CUDA), and these kernels on a host copy (fastprox/_host.py) for
// every other device. Fake (meta) implementations live in fastprox/_registry.py; the math
// contract is docs/SPEC.md.
//
// The mutating op takes the weights as Tensor(a!)[] and returns nothing (a custom op may not
// return its mutated input); the Python wrappers return the weights. Thresholds travel in a
// tensor so that changing them under torch.compile does not recompile the graph.
#include <Python.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

TORCH_LIBRARY(fastprox, m) {
  m.def("group_norms(Tensor weight, int[] dim) -> Tensor");
  // One step per tensor of a list. lams: float64, 3 values per tensor, row-major (any shape:
  // (T, 3) or flat), (lam_l1, lam_group, lam_exclusive); tensor i reduces the next
  // dim_counts[i] entries of dims. `caller` and `lam_names` name the calling function and its
  // three thresholds in error messages (a preset passes them when the kernel must check a
  // threshold it could not). csrc/cpu/foreach_prox.cpp.
  m.def(
      "foreach_prox_(Tensor(a!)[] weights, Tensor lams, int[] dims, int[] dim_counts, "
      "bool[] size_weighted, bool[] exact, str caller=\"foreach_prox_\", "
      "str[]? lam_names=None) -> ()");
  // The phases of a step whose groups lie in several places (coupled groups across tensors,
  // groups across shards; fastprox/_phases.py): per-group sums of soft(W, lam_l1) (what: 1 sum
  // of squares, 2 sum of magnitudes and nonzero count, 3 both; float32, float64 for float64
  // weights, stacked on a first dimension), the sum and count of the scaled magnitudes above a
  // given per-group threshold (a Newton step of the exact exclusive threshold), and the rewrite
  // with given per-group scale and threshold. csrc/cpu/group_phases.cpp.
  m.def(
      "foreach_group_sums(Tensor[] weights, int[] dims, int[] dim_counts, float[] lam_l1, "
      "int what) -> Tensor[]");
  m.def(
      "foreach_group_rewrite_(Tensor(a!)[] weights, int[] dims, int[] dim_counts, "
      "float[] lam_l1, Tensor?[] scales, Tensor?[] taus) -> ()");
  m.def(
      "foreach_group_sums_above(Tensor[] weights, int[] dims, int[] dim_counts, "
      "float[] lam_l1, Tensor?[] scales, Tensor[] taus) -> Tensor[]");
  // The fused step in an optimizer's diagonal metric d = (sqrt(v * s) + eps) / lr, per weight
  // with its second moment v (lams: (T, 3) thresholds as in foreach_prox_; metric: (T, 3)
  // float64 (s, eps, lr)). Every v must be finite and >= 0 and share no memory with a weight
  // (checked before any write; moments_checked: the caller found the values of every moment
  // used finite and >= 0, and the op checks only where they lie); `names` names the moments in
  // errors (default "moments[i]"). csrc/cpu/metric_prox.cpp.
  m.def(
      "foreach_metric_prox_(Tensor(a!)[] weights, Tensor[] moments, Tensor lams, Tensor metric, "
      "int[] dims, int[] dim_counts, bool[] size_weighted, bool[] exact, "
      "str[]? names=None, bool moments_checked=False) -> ()");
  // The step of coupled groups (fastprox/coupled.py) in that metric, for a list of sets run one
  // after another: set j has the next set_sizes[j] members (each with its moment, the axis its
  // slices are taken along and its metric row), its groups' slices (slices[j]: int64 rows
  // (member in the set, position), group by group; starts[j]: int64, groups + 1 offsets into
  // them), per-group group thresholds t_g (thresholds[j]: float64), lam_l1[j], lam_exclusive[j]
  // and exact[j]. direct: the moments are the metric d itself (metric rows unused). Every check
  // before any write (moments_checked: as for foreach_metric_prox_); `names` names the moments
  // in errors. csrc/cpu/coupled_metric.cpp.
  m.def(
      "coupled_metric_prox_(Tensor(a!)[] members, Tensor[] moments, int[] axes, Tensor metric, "
      "int[] set_sizes, Tensor[] slices, Tensor[] starts, Tensor[] thresholds, "
      "float[] lam_l1, float[] lam_exclusive, bool[] exact, bool direct=False, "
      "str[]? names=None, bool moments_checked=False) -> ()");
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
  m.impl("foreach_prox_", torch::CppFunction::makeFromBoxedFunction<&bump_mutated_versions>());
  m.impl("foreach_group_rewrite_",
         torch::CppFunction::makeFromBoxedFunction<&bump_mutated_versions>());
  m.impl("foreach_metric_prox_",
         torch::CppFunction::makeFromBoxedFunction<&bump_mutated_versions>());
  m.impl("coupled_metric_prox_",
         torch::CppFunction::makeFromBoxedFunction<&bump_mutated_versions>());
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
