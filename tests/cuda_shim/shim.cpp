// csrc/cuda/kernels.cuh compiled for the CPU under host_shim.h, with a small
// Python binding: the tests call the same run_sgd/run_adam the CUDA ops call,
// on CPU tensors' memory (passed as data_ptr integers), and compare with
// torch.optim. Deliberately includes no torch/extension.h, to compile fast.
#include "host_shim.h"

// Order matters: the shim's macros must be defined before the kernel source.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cuda/kernels.cuh"

namespace py = pybind11;
using namespace frozenopt::cuda;

namespace {

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A row table as the kernels read it: the rows one after the other.
std::vector<double> flat_rows(const std::vector<std::vector<double>>& table, int width) {
  std::vector<double> flat;
  for (const auto& row : table) {
    if (static_cast<int>(row.size()) != width) throw py::value_error("a row of the wrong width");
    flat.insert(flat.end(), row.begin(), row.end());
  }
  return flat;
}

// rows: per tensor, the addresses of its rows (param, grad, states...; Adam's
// step counter in row 4); numels and dtypes per tensor.
std::vector<OpTensor> op_tensors(const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
                                 const std::vector<int>& dtypes) {
  if (rows.size() != numels.size() || rows.size() != dtypes.size()) throw py::value_error("list lengths differ");
  std::vector<OpTensor> out(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    out[i].dtype = static_cast<DType>(dtypes[i]);
    out[i].numel = numels[i];
    if (rows[i].size() > size_t(frozenopt::mt::kMaxDepth)) throw py::value_error("too many rows");
    for (size_t r = 0; r < rows[i].size(); ++r) out[i].rows[r] = ptr(rows[i][r]);
  }
  return out;
}

// (address or 0, is_double, host value)
ScalarArg scalar(const py::tuple& t) { return {ptr(t[0].cast<uintptr_t>()), t[1].cast<int>(), t[2].cast<double>()}; }

StepArgs step_args(uintptr_t mask, const py::tuple& found_inf, const py::tuple& grad_scale, const py::tuple& lr) {
  return {static_cast<const uint8_t*>(ptr(mask)), scalar(found_inf), scalar(grad_scale), scalar(lr)};
}

size_t budget(bool small) { return small ? frozenopt::mt::kSmallArgBytes : frozenopt::mt::kLargeArgBytes; }

py::dict stats_dict() {
  py::dict d;
  d["launches"] = shim::stats.launches;
  d["blocks"] = shim::stats.blocks;
  d["threads"] = shim::stats.threads;
  d["barriers"] = shim::stats.barriers;
  d["grids"] = shim::stats.grid_of_launch;
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "frozenopt's CUDA kernels run on the CPU under a host shim (tests only)";
  m.def(
      "sgd",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale, py::tuple lr,
         double momentum, double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
         int max_tensors, int max_blocks, bool small_budget) {
        const SGDArgs args{step_args(mask, found_inf, grad_scale, lr),
                           {momentum, dampening, weight_decay, nesterov, maximize, first_step}};
        const auto tensors = op_tensors(rows, numels, dtypes);
        shim::Launcher launcher;
        return with_budget(budget(small_budget), [&](auto b) {
          return run_sgd<decltype(b)::value>(tensors, args, launcher, LimitOverride{max_tensors, max_blocks, 0});
        });
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"),
      py::arg("nesterov"), py::arg("maximize"), py::arg("first_step"), py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0, py::arg("small_budget") = false);
  m.def(
      "adam",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale, py::tuple lr,
         double beta1, double beta2, double eps, double weight_decay, bool amsgrad, bool maximize, bool decoupled,
         int max_tensors, int max_blocks, int max_steps, bool small_budget) {
        const auto tensors = op_tensors(rows, numels, dtypes);
        std::vector<AdamTensorScalars> scratch(tensors.size());
        const AdamArgs args{step_args(mask, found_inf, grad_scale, lr),
                            scratch.data(),
                            {beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled}};
        shim::Launcher launcher;
        return with_budget(budget(small_budget), [&](auto b) {
          return run_adam<decltype(b)::value>(tensors, args, launcher,
                                              LimitOverride{max_tensors, max_blocks, max_steps});
        });
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
      py::arg("amsgrad"), py::arg("maximize"), py::arg("decoupled"), py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0, py::arg("max_steps") = 0, py::arg("small_budget") = false);
  // The same launches with a step plan's group table: each tensor takes the
  // hyper-parameters and lr of its group (groups[tensor_group[tensor id]]).
  // The op's own lr is NaN, so a kernel that read it would be seen.
  m.def(
      "sgd_table",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale,
         const std::vector<std::tuple<py::tuple, double, double, double, bool, bool>>& groups,
         const std::vector<int32_t>& tensor_group, int max_tensors, int max_blocks) {
        std::vector<GroupEntry<frozenopt::math::SGDHyper>> entries;
        for (const auto& [lr, momentum, dampening, weight_decay, nesterov, maximize] : groups) {
          entries.push_back({{momentum, dampening, weight_decay, nesterov, maximize, false}, scalar(lr)});
        }
        const SGDArgs args{step_args(mask, found_inf, grad_scale, py::make_tuple(0, 0, NAN)),
                           entries.at(0).hyper,
                           {entries.data(), tensor_group.data()}};
        const auto tensors = op_tensors(rows, numels, dtypes);
        if (tensor_group.size() != tensors.size()) throw py::value_error("one group index per tensor");
        shim::Launcher launcher;
        return run_sgd<frozenopt::mt::kLargeArgBytes>(tensors, args, launcher,
                                                      LimitOverride{max_tensors, max_blocks, 0});
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("groups"), py::arg("tensor_group"), py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0);
  m.def(
      "adam_table",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale,
         const std::vector<std::tuple<py::tuple, double, double, double, double, bool, bool, bool>>& groups,
         const std::vector<int32_t>& tensor_group, int max_tensors, int max_blocks) {
        std::vector<GroupEntry<frozenopt::math::AdamHyper>> entries;
        for (const auto& [lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled] : groups) {
          entries.push_back({{beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled}, scalar(lr)});
        }
        const auto tensors = op_tensors(rows, numels, dtypes);
        if (tensor_group.size() != tensors.size()) throw py::value_error("one group index per tensor");
        std::vector<AdamTensorScalars> scratch(tensors.size());
        const AdamArgs args{step_args(mask, found_inf, grad_scale, py::make_tuple(0, 0, NAN)),
                            scratch.data(),
                            entries.at(0).hyper,
                            {entries.data(), tensor_group.data()}};
        shim::Launcher launcher;
        return run_adam<frozenopt::mt::kLargeArgBytes>(tensors, args, launcher,
                                                       LimitOverride{max_tensors, max_blocks, 0});
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("groups"), py::arg("tensor_group"), py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0);
  // The same launches with a *_groups_ op's row table (update_math.h's rows,
  // the lr a value of the row): each tensor takes row tensor_group[tensor id],
  // and one whose row is missing is skipped. The op's own hyper-parameters
  // give only the layout (momentum, amsgrad) and SGD's first step.
  m.def(
      "sgd_rows",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale,
         const std::vector<std::vector<double>>& table, const std::vector<int32_t>& tensor_group, bool momentum,
         bool first_step, int max_tensors, int max_blocks) {
        const auto flat = flat_rows(table, frozenopt::math::kRowWidth<frozenopt::math::SGDHyper>);
        const auto tensors = op_tensors(rows, numels, dtypes);
        if (tensor_group.size() != tensors.size()) throw py::value_error("one group index per tensor");
        const SGDArgs args{step_args(mask, found_inf, grad_scale, py::make_tuple(0, 0, NAN)),
                           {momentum ? 1.0 : 0.0, 0.0, 0.0, false, false, first_step},
                           {nullptr, tensor_group.data(), flat.data(), static_cast<int32_t>(table.size())}};
        shim::Launcher launcher;
        return run_sgd<frozenopt::mt::kLargeArgBytes>(tensors, args, launcher,
                                                      LimitOverride{max_tensors, max_blocks, 0});
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("table"), py::arg("tensor_group"), py::arg("momentum"), py::arg("first_step"),
      py::arg("max_tensors") = 0, py::arg("max_blocks") = 0);
  m.def(
      "adam_rows",
      [](const std::vector<std::vector<uintptr_t>>& rows, const std::vector<int64_t>& numels,
         const std::vector<int>& dtypes, uintptr_t mask, py::tuple found_inf, py::tuple grad_scale,
         const std::vector<std::vector<double>>& table, const std::vector<int32_t>& tensor_group, bool amsgrad,
         int max_tensors, int max_blocks) {
        const auto flat = flat_rows(table, frozenopt::math::kRowWidth<frozenopt::math::AdamHyper>);
        const auto tensors = op_tensors(rows, numels, dtypes);
        if (tensor_group.size() != tensors.size()) throw py::value_error("one group index per tensor");
        std::vector<AdamTensorScalars> scratch(tensors.size());
        const AdamArgs args{step_args(mask, found_inf, grad_scale, py::make_tuple(0, 0, NAN)),
                            scratch.data(),
                            {0.0, 0.0, 0.0, 0.0, amsgrad, false, false},
                            {nullptr, tensor_group.data(), flat.data(), static_cast<int32_t>(table.size())}};
        shim::Launcher launcher;
        return run_adam<frozenopt::mt::kLargeArgBytes>(tensors, args, launcher,
                                                       LimitOverride{max_tensors, max_blocks, 0});
      },
      py::arg("rows"), py::arg("numels"), py::arg("dtypes"), py::arg("mask"), py::arg("found_inf"),
      py::arg("grad_scale"), py::arg("table"), py::arg("tensor_group"), py::arg("amsgrad"), py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0);
  m.def(
      "pack_alignment",
      [](int dtype) {
        size_t alignment = 0;
        dispatch_dtype(static_cast<DType>(dtype), [&](auto tag) { alignment = alignof(Pack<decltype(tag)>); });
        return alignment;
      },
      py::arg("dtype"), "the alignment, in bytes, the vector path needs of every row of a chunk");
  m.def("stats", &stats_dict, "counters since the last reset: launches, blocks, threads, barriers, grids");
  m.def("reset_stats", [] { shim::stats = shim::Stats{}; });
  m.def(
      "set_block_filter",
      [](std::optional<std::vector<std::pair<int, int>>> allowed) {
        shim::block_filter = shim::BlockFilter{};
        if (allowed) {
          shim::block_filter.on = true;
          shim::block_filter.allowed = *allowed;
        }
      },
      py::arg("allowed"), "run only these (launch, block) pairs of the next launches; None: run all");
  m.def(
      "poisoned_page",
      [] {
        // A page no access is allowed to: a kernel that loads from it crashes.
        static void* page = mmap(nullptr, 1 << 16, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        return reinterpret_cast<uintptr_t>(page);
      },
      "the address of 64 KB of memory that may not be read or written");
}
