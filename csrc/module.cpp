// The Python module frozenopt._C: the grad check, the eager step plan
// (step_plan.h), the launch planner (multi_tensor/plan_py.cpp) and the
// watch (watch.cpp). The ops themselves are reached as torch.ops.frozenopt.*
// (schemas.cpp).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "step_plan.h"

namespace frozenopt {

void bind_launch_plan(pybind11::module_& m);  // multi_tensor/plan_py.cpp
void bind_watch(pybind11::module_& m);        // watch.cpp

}  // namespace frozenopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using frozenopt::StepPlan;
  m.doc() = "frozenopt's compiled ops (torch.ops.frozenopt.*) and the eager step plan";
  frozenopt::bind_launch_plan(m);
  frozenopt::bind_watch(m);
  m.def(
      "check_grads",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
        frozenopt::check_grads(frozenopt::kStepCheck, params, grads);
      },
      py::arg("params"), py::arg("grads"), "Raises the step ops' error for a bad grad, changing nothing.");
  // A step's group entries come as tuples, in the order of the op's arguments:
  // sgd (lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize);
  // adam (lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize,
  // decoupled_weight_decay).
  using SGDTuple = std::tuple<double, frozenopt::OptTensor, double, double, double, bool, bool>;
  using AdamTuple = std::tuple<double, frozenopt::OptTensor, double, double, double, double, bool, bool, bool>;
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<const std::string&, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>,
                    std::vector<int32_t>>(),
           py::arg("kind"), py::arg("params"), py::arg("states"), py::arg("groups") = std::vector<int32_t>())
      .def("__len__", &StepPlan::size)
      .def("check_grads", &StepPlan::check_grads)
      .def(
          "sgd",
          [](StepPlan& plan, const std::vector<SGDTuple>& groups, const frozenopt::OptTensor& grad_scale,
             const frozenopt::OptTensor& found_inf) {
            std::vector<frozenopt::SGDGroup> entries;
            entries.reserve(groups.size());
            for (const auto& [lr, lr_tensor, momentum, dampening, weight_decay, nesterov, maximize] : groups) {
              entries.push_back({lr, lr_tensor, {momentum, dampening, weight_decay, nesterov, maximize, false}});
            }
            plan.sgd(entries, grad_scale, found_inf);
          },
          py::arg("groups"), py::arg("grad_scale"), py::arg("found_inf"))
      .def(
          "adam",
          [](StepPlan& plan, const std::vector<AdamTuple>& groups, const frozenopt::OptTensor& grad_scale,
             const frozenopt::OptTensor& found_inf) {
            std::vector<frozenopt::AdamGroup> entries;
            entries.reserve(groups.size());
            for (const auto& [lr, lr_tensor, beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled] : groups) {
              entries.push_back({lr, lr_tensor, {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled}});
            }
            plan.adam(entries, grad_scale, found_inf);
          },
          py::arg("groups"), py::arg("grad_scale"), py::arg("found_inf"));
}
