// The Python module frozenopt._C: the grad check, the eager step plan
// (step_plan.h), the launch planner (multi_tensor/plan_py.cpp) and the
// watch (watch.cpp). The ops themselves are reached as torch.ops.frozenopt.*
// (schemas.cpp).
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <string>
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
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<const std::string&, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>>(),
           py::arg("kind"), py::arg("params"), py::arg("states"))
      .def("__len__", &StepPlan::size)
      .def("check_grads", &StepPlan::check_grads)
      .def("sgd", &StepPlan::sgd, py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
           py::arg("found_inf"))
      .def("adam", &StepPlan::adam, py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
           py::arg("weight_decay"), py::arg("eps"), py::arg("amsgrad"), py::arg("maximize"),
           py::arg("decoupled_weight_decay"), py::arg("grad_scale"), py::arg("found_inf"));
}
