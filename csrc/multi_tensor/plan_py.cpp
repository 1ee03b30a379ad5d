// Python view of the launch planner (launch_plan.h), built into every
// frozenopt._C, CUDA or not: the CPU tests check the metadata the CUDA ops
// would launch with, and the bytes-moved benchmark counts launches per step.
// Addresses are fake: (tensor_id + 1) << 20 | row << 12, so a test can tell
// which tensor and row a slot points at.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

#include "kernel_args.h"
#include "launch_plan.h"
#if defined(FROZENOPT_WITH_CUDA)
#include "../cuda/launch.h"
#endif

namespace py = pybind11;

namespace frozenopt {
namespace cuda {
namespace {

constexpr bool kBuiltWithCuda =
#if defined(FROZENOPT_WITH_CUDA)
    true;
#else
    false;
#endif

template <typename M>
py::list plan_with(const std::vector<int64_t>& numels, int max_tensors, int max_blocks) {
  std::vector<mt::TensorRef> refs(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    refs[i].numel = numels[i];
    refs[i].tensor_id = static_cast<int32_t>(i);
    for (int d = 0; d < mt::kMaxDepth; ++d) {
      refs[i].addresses[d] = reinterpret_cast<void*>(((uintptr_t(i) + 1) << 20) | (uintptr_t(d) << 12));
    }
  }
  py::list launches;
  mt::for_each_launch<M>(
      refs,
      [&](const M& meta) {
        py::list slots, blocks;
        for (int s = 0; s < meta.num_slots; ++s) {
          std::vector<uintptr_t> addresses(M::kDepth);
          for (int d = 0; d < M::kDepth; ++d) addresses[d] = reinterpret_cast<uintptr_t>(meta.addresses[d][s]);
          slots.append(py::make_tuple(meta.tensor_id[s], meta.numel[s], addresses));
        }
        for (int b = 0; b < meta.num_blocks; ++b)
          blocks.append(py::make_tuple(int(meta.block_slot[b]), meta.block_chunk[b]));
        py::dict launch;
        launch["slots"] = slots;
        launch["blocks"] = blocks;
        launch["meta_bytes"] = sizeof(M);
        launches.append(launch);
      },
      max_tensors ? max_tensors : M::kMaxTensors, max_blocks ? max_blocks : M::kMaxBlocks);
  return launches;
}

template <size_t Budget>
py::list plan_budget(int depth, const std::vector<int64_t>& numels, int max_tensors, int max_blocks) {
  switch (depth) {
    case 2: return plan_with<mt::MetaFor<2, Budget>>(numels, max_tensors, max_blocks);
    case 3: return plan_with<mt::MetaFor<3, Budget>>(numels, max_tensors, max_blocks);
    case 5: return plan_with<mt::MetaFor<5, Budget>>(numels, max_tensors, max_blocks);
    case 6: return plan_with<mt::MetaFor<6, Budget>>(numels, max_tensors, max_blocks);
    default: throw py::value_error("depth must be 2, 3 (sgd), 5 or 6 (adam)");
  }
}

template <size_t Budget>
int count_with(int depth, const std::vector<int64_t>& numels) {
  std::vector<mt::TensorRef> refs(numels.size());
  for (size_t i = 0; i < numels.size(); ++i) {
    refs[i].numel = numels[i];
    refs[i].tensor_id = static_cast<int32_t>(i);
  }
  int n = 0;
  auto count = [&](const auto&) { ++n; };
  switch (depth) {
    case 2: mt::for_each_launch<mt::MetaFor<2, Budget>>(refs, count); break;
    case 3: mt::for_each_launch<mt::MetaFor<3, Budget>>(refs, count); break;
    case 5: mt::for_each_launch<mt::MetaFor<5, Budget>>(refs, count); break;
    case 6: mt::for_each_launch<mt::MetaFor<6, Budget>>(refs, count); break;
    default: throw py::value_error("depth must be 2, 3 (sgd), 5 or 6 (adam)");
  }
  return n;
}

size_t budget_of(const std::string& which) {
  if (which == "large") return mt::kLargeArgBytes;
  if (which == "small") return mt::kSmallArgBytes;
  throw py::value_error("budget must be 'large' (32 KB) or 'small' (4 KB)");
}

const char* budget_name(size_t bytes) { return bytes == mt::kLargeArgBytes ? "large" : "small"; }

}  // namespace
}  // namespace cuda

void bind_launch_plan(py::module_& parent) {
  using namespace cuda;
  py::module_ m = parent.def_submodule("cuda_plan", "The CUDA multi-tensor launch planner, runnable on the CPU");
  m.attr("built_with_cuda") = kBuiltWithCuda;
  m.attr("chunk_size") = mt::kChunkSize;
  m.attr("block_threads") = mt::kBlockThreads;
  m.attr("ilp") = mt::kILP;
  m.attr("large_args_built") = kLargeArgsBuilt;
  m.attr("budget_bytes") = py::dict(py::arg("large") = mt::kLargeArgBytes, py::arg("small") = mt::kSmallArgBytes);
  m.def(
      "budget_for",
      [](int driver_version, int compute_major) { return budget_name(choose_budget(driver_version, compute_major)); },
      py::arg("driver_version"), py::arg("compute_major"),
      "The budget ('large' or 'small') launches use with this driver version (e.g. 12010 for CUDA 12.1) "
      "and a device of this compute capability major, in this build");
#if defined(FROZENOPT_WITH_CUDA)
  m.def(
      "device_budget", [](int device) { return budget_name(kernel_arg_budget(device)); }, py::arg("device"),
      "The budget launches on this CUDA device use (the driver and the device decide)");
#endif
  m.def(
      "limits",
      [](int depth, const std::string& budget) {
        const size_t b = budget_of(budget);
        const mt::Limits l = mt::limits_for(depth, b);
        return py::make_tuple(l.max_tensors, l.max_blocks, mt::step_limit(b));
      },
      py::arg("depth"), py::arg("budget") = "large", "(max tensors, max blocks, max steps) per launch");
  m.def(
      "plan",
      [](int depth, const std::vector<int64_t>& numels, const std::string& budget, int max_tensors, int max_blocks) {
        if (budget_of(budget) == mt::kLargeArgBytes)
          return plan_budget<mt::kLargeArgBytes>(depth, numels, max_tensors, max_blocks);
        return plan_budget<mt::kSmallArgBytes>(depth, numels, max_tensors, max_blocks);
      },
      py::arg("depth"), py::arg("numels"), py::arg("budget") = "large", py::arg("max_tensors") = 0,
      py::arg("max_blocks") = 0,
      "The launches for tensors of these sizes (tensor id = list index): a list of dicts with 'slots' "
      "[(tensor_id, numel, [address per row])], 'blocks' [(slot, chunk)] and 'meta_bytes'.");
  m.def(
      "count_launches",
      [](int depth, const std::vector<int64_t>& numels, const std::string& budget) {
        if (budget_of(budget) == mt::kLargeArgBytes) return count_with<mt::kLargeArgBytes>(depth, numels);
        return count_with<mt::kSmallArgBytes>(depth, numels);
      },
      py::arg("depth"), py::arg("numels"), py::arg("budget") = "large",
      "Element-kernel launches for tensors of these sizes (without building the metadata lists).");
  m.def(
      "count_step_launches",
      [](int64_t tensors, const std::string& budget) {
        const int64_t per = mt::step_limit(budget_of(budget));
        return (tensors + per - 1) / per;
      },
      py::arg("tensors"), py::arg("budget") = "large");
}

}  // namespace frozenopt
