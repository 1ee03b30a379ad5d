// Op schemas (the one place they are declared) and the step plan.
//
// The ops take every param of a group plus one mask entry per param, so a
// compiled graph or a captured CUDA graph stays valid when the mask flips.
// The plan is the eager fast path: it holds only the unfrozen params and their
// state, reads param.grad() itself, and calls the same ops through the
// dispatcher, so per-step host work is a C++ loop over the unfrozen params.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/stl.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "ops.h"

TORCH_LIBRARY(frozenopt, m) {
  m.def(
      "sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor? mask, *, "
      "float lr, Tensor? lr_tensor=None, float momentum, float dampening, float weight_decay, "
      "bool nesterov, bool maximize, bool is_first_step, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor? mask, *, float lr, "
      "Tensor? lr_tensor=None, float beta1, float beta2, float weight_decay, float eps, bool amsgrad, "
      "bool maximize, bool decoupled_weight_decay, Tensor? grad_scale=None, "
      "Tensor? found_inf=None) -> ()");
}

namespace frozenopt {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The unfrozen params of one param group whose state exists, in group order.
// Python rebuilds a plan when the frozen set, the state or the group changes.
class StepPlan {
 public:
  // states: the op's state lists in its order (sgd: momentum_buffers; adam:
  // exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), each parallel to
  // params, or empty where the op takes none (no momentum, no amsgrad).
  StepPlan(std::string kind, std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> states)
      : params_(std::move(params)), states_(std::move(states)) {
    const size_t lists = kind == "sgd" ? 1 : kind == "adam" ? 4 : 0;
    TORCH_CHECK(lists > 0, "StepPlan: unknown optimizer kind '", kind, "'");
    TORCH_CHECK(states_.size() == lists, "StepPlan: ", kind, " takes ", lists, " state lists, got ", states_.size());
    for (const auto& list : states_) {
      TORCH_CHECK(list.empty() || list.size() == params_.size(), "StepPlan: a state list has ",
                  list.size(), " entries for ", params_.size(), " params");
    }
  }

  int64_t size() const { return static_cast<int64_t>(params_.size()); }

  // The op's own checks, without stepping: lets a step over several groups
  // fail before any of them has moved.
  void check_grads() const {
    const Gathered g = gather();
    check_step_args("frozenopt step", g.params, g.grads, {}, std::nullopt, std::nullopt, std::nullopt,
                    std::nullopt);
  }

  void sgd(double lr, const OptTensor& lr_tensor, double momentum, double dampening, double weight_decay,
           bool nesterov, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("frozenopt::sgd_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList, const OptTensor&, double,
                                     const OptTensor&, double, double, double, bool, bool, bool,
                                     const OptTensor&, const OptTensor&)>();
    const Gathered g = gather();
    if (g.params.empty()) return;
    op.call(g.params, g.grads, g.states[0], std::nullopt, lr, lr_tensor, momentum, dampening, weight_decay,
            nesterov, maximize, /*is_first_step=*/false, grad_scale, found_inf);
  }

  void adam(double lr, const OptTensor& lr_tensor, double beta1, double beta2, double weight_decay, double eps,
            bool amsgrad, bool maximize, bool decoupled_weight_decay, const OptTensor& grad_scale,
            const OptTensor& found_inf) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("frozenopt::adam_", "")
                         .typed<void(at::TensorList, at::TensorList, at::TensorList, at::TensorList,
                                     at::TensorList, at::TensorList, const OptTensor&, double, const OptTensor&,
                                     double, double, double, double, bool, bool, bool, const OptTensor&,
                                     const OptTensor&)>();
    const Gathered g = gather();
    if (g.params.empty()) return;
    op.call(g.params, g.grads, g.states[0], g.states[1], g.states[2], g.states[3], std::nullopt, lr, lr_tensor,
            beta1, beta2, weight_decay, eps, amsgrad, maximize, decoupled_weight_decay, grad_scale, found_inf);
  }

 private:
  struct Gathered {
    std::vector<at::Tensor> params, grads;
    std::vector<std::vector<at::Tensor>> states;
  };

  // The params that have a grad this step, like torch.optim's grad-is-None skip.
  Gathered gather() const {
    Gathered g;
    g.states.resize(states_.size());
    const size_t n = params_.size();
    g.params.reserve(n);
    g.grads.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      const at::Tensor& grad = params_[i].grad();
      if (!grad.defined()) continue;
      g.params.push_back(params_[i]);
      g.grads.push_back(grad);
      for (size_t k = 0; k < states_.size(); ++k) {
        if (!states_[k].empty()) g.states[k].push_back(states_[k][i]);
      }
    }
    return g;
  }

  std::vector<at::Tensor> params_;
  std::vector<std::vector<at::Tensor>> states_;
};

}  // namespace

// csrc/cuda/plan_py.cpp: the CUDA launch planner, exposed as _C.cuda_plan.
void bind_launch_plan(pybind11::module_& m);

}  // namespace frozenopt

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using frozenopt::StepPlan;
  m.doc() = "frozenopt's compiled ops (torch.ops.frozenopt.*) and the eager step plan";
  frozenopt::bind_launch_plan(m);
  m.def(
      "check_grads",
      [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads) {
        frozenopt::check_step_args("frozenopt step", params, grads, {}, std::nullopt, std::nullopt, std::nullopt,
                                   std::nullopt);
      },
      py::arg("params"), py::arg("grads"), "Raises the step ops' error for a bad grad, changing nothing.");
  py::class_<StepPlan>(m, "StepPlan")
      .def(py::init<std::string, std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>>(), py::arg("kind"),
           py::arg("params"), py::arg("states"))
      .def("__len__", &StepPlan::size)
      .def("check_grads", &StepPlan::check_grads)
      .def("sgd", &StepPlan::sgd, py::arg("lr"), py::arg("lr_tensor"), py::arg("momentum"), py::arg("dampening"),
           py::arg("weight_decay"), py::arg("nesterov"), py::arg("maximize"), py::arg("grad_scale"),
           py::arg("found_inf"))
      .def("adam", &StepPlan::adam, py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("beta2"),
           py::arg("weight_decay"), py::arg("eps"), py::arg("amsgrad"), py::arg("maximize"),
           py::arg("decoupled_weight_decay"), py::arg("grad_scale"), py::arg("found_inf"));
}
