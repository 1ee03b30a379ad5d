// The optimizer's check, before each step, that what its Python side holds is
// still what its cached step plans were built from.
//
// torch.optim reads param_groups and state afresh at every step, and user and
// library code edits them between steps: a param swapped in a group's list, a
// group appended or deleted, a state entry replaced or deleted, the state dict
// replaced, requires_grad flipped (PEFT, Lightning's finetuning callbacks). A
// Watch records the identities of all of these when the plans are built and,
// at each step, compares them with what Python holds now: pointer and flag
// compares over the lists and dicts, no hashing of tensors (Tensor.__hash__ is
// a Python function). It names the param groups whose plans must be rebuilt.
//
// It holds references to everything it recorded, so an object the user
// dropped cannot be freed and its address reused by a new one that would
// compare equal. Storage changes inside a tensor (`t.data = ...`) are the
// plan's to notice: it compares data pointers itself.
//
// A state dict is compared by its version tag where CPython has one that
// changes on every edit of the dict (PEP 509; 3.10 to 3.12): one compare per
// dict instead of a walk over its entries. Elsewhere the entries are walked.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

#if PY_VERSION_HEX < 0x030D0000
#define FROZENOPT_DICT_VERSIONS 1
#endif

namespace frozenopt {
namespace {

namespace py = pybind11;

#ifdef FROZENOPT_DICT_VERSIONS
uint64_t version_of(PyObject* dict) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  return reinterpret_cast<PyDictObject*>(dict)->ma_version_tag;
#pragma GCC diagnostic pop
}
#endif

bool requires_grad(PyObject* obj) { return THPVariable_Check(obj) && THPVariable_Unpack(obj).requires_grad(); }

class Watch {
 public:
  // Records param_groups (a list of dicts with a "params" list each), every
  // param in them, their requires_grad when the frozen set follows it, and the
  // state dict with every entry of every per-param state dict.
  void snapshot(py::handle groups, py::handle state, bool follow_requires_grad) {
    clear();
    if (!PyList_Check(groups.ptr()) || !PyDict_Check(state.ptr())) return;  // stale until they are
    groups_ = py::reinterpret_borrow<py::object>(groups);
    state_ = py::reinterpret_borrow<py::object>(state);
    follow_requires_grad_ = follow_requires_grad;
    const Py_ssize_t n = PyList_GET_SIZE(groups.ptr());
    for (Py_ssize_t g = 0; g < n; ++g) {
      PyObject* group = PyList_GET_ITEM(groups.ptr(), g);
      PyObject* params = PyDict_Check(group) ? PyDict_GetItem(group, params_key()) : nullptr;
      if (params == nullptr || !PyList_Check(params)) {
        clear();
        return;
      }
      group_dicts_.push_back(borrow(group));
      param_lists_.push_back(borrow(params));
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(params); ++i) {
        PyObject* p = PyList_GET_ITEM(params, i);
        params_.push_back(borrow(p));
        requires_grad_.push_back(follow_requires_grad && requires_grad(p));
        group_of_.emplace(p, static_cast<int64_t>(g));
      }
      group_ends_.push_back(params_.size());
    }
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      keys_.push_back(borrow(key));
      values_.push_back(borrow(value));
#ifdef FROZENOPT_DICT_VERSIONS
      versions_.push_back(PyDict_Check(value) ? version_of(value) : 0);
#else
      Py_ssize_t inner = 0;
      PyObject *k, *v;
      while (PyDict_Check(value) && PyDict_Next(value, &inner, &k, &v)) {
        entry_keys_.push_back(borrow(k));
        entry_values_.push_back(borrow(v));
      }
      entry_ends_.push_back(entry_keys_.size());
#endif
    }
#ifdef FROZENOPT_DICT_VERSIONS
    state_version_ = version_of(state.ptr());
#endif
    valid_ = true;
  }

  // Forgets the record: every group is stale until the next snapshot.
  void clear() {
    valid_ = false;
    groups_ = state_ = py::object();
    group_dicts_.clear();
    param_lists_.clear();
    params_.clear();
    requires_grad_.clear();
    group_ends_.clear();
    group_of_.clear();
    keys_.clear();
    values_.clear();
    versions_.clear();
    entry_keys_.clear();
    entry_values_.clear();
    entry_ends_.clear();
  }

  // The indices of the groups whose plans are stale, in order; empty when
  // nothing changed. Every group when the list of groups or the state dict
  // itself was replaced, reordered or grew.
  std::vector<int64_t> stale(py::handle groups, py::handle state) const {
    const Py_ssize_t n = PyList_Check(groups.ptr()) ? PyList_GET_SIZE(groups.ptr()) : 0;
    std::vector<int64_t> all(n);
    for (Py_ssize_t g = 0; g < n; ++g) all[g] = g;
    if (!valid_ || groups.ptr() != groups_.ptr() || state.ptr() != state_.ptr() ||
        n != static_cast<Py_ssize_t>(group_dicts_.size()) || !PyDict_Check(state.ptr())) {
      return all;
    }
    std::vector<char> marked(n, 0);
    for (Py_ssize_t g = 0; g < n; ++g) {
      PyObject* group = PyList_GET_ITEM(groups.ptr(), g);
      if (group != group_dicts_[g].ptr()) return all;
      marked[g] = !group_unchanged(g, PyDict_GetItem(group, params_key()));
    }
    auto mark_owner = [&](PyObject* key) {
      const auto owner = group_of_.find(key);
      if (owner == group_of_.end()) return false;
      marked[owner->second] = 1;
      return true;
    };
#ifdef FROZENOPT_DICT_VERSIONS
    if (version_of(state.ptr()) == state_version_) {  // the same entries: only their dicts may have changed
      for (size_t k = 0; k < keys_.size(); ++k) {
        if (!entry_unchanged(k, values_[k].ptr()) && !mark_owner(keys_[k].ptr())) return all;
      }
      return marked_groups(marked);
    }
#endif
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    size_t k = 0;
    while (PyDict_Next(state.ptr(), &pos, &key, &value)) {
      if (k >= keys_.size() || key != keys_[k].ptr()) return all;  // an entry added or deleted
      if (!entry_unchanged(k, value) && !mark_owner(key)) return all;
      ++k;
    }
    if (k != keys_.size()) return all;
    return marked_groups(marked);
  }

 private:
  static PyObject* params_key() {
    static PyObject* key = PyUnicode_InternFromString("params");
    return key;
  }

  static py::object borrow(PyObject* obj) { return py::reinterpret_borrow<py::object>(obj); }

  // The group's params list is the same list object, with the same params in
  // the same order, and (when followed) the same requires_grad flags.
  bool group_unchanged(Py_ssize_t g, PyObject* params) const {
    const size_t begin = g == 0 ? 0 : group_ends_[g - 1], end = group_ends_[g];
    if (params != param_lists_[g].ptr() || PyList_GET_SIZE(params) != static_cast<Py_ssize_t>(end - begin)) {
      return false;
    }
    for (size_t i = begin; i < end; ++i) {
      PyObject* p = PyList_GET_ITEM(params, i - begin);
      if (p != params_[i].ptr()) return false;
      if (follow_requires_grad_ && requires_grad(p) != static_cast<bool>(requires_grad_[i])) return false;
    }
    return true;
  }

  static std::vector<int64_t> marked_groups(const std::vector<char>& marked) {
    std::vector<int64_t> out;
    for (size_t g = 0; g < marked.size(); ++g) {
      if (marked[g]) out.push_back(static_cast<int64_t>(g));
    }
    return out;
  }

  // State entry k is the same dict holding the same (key, value) pairs.
  bool entry_unchanged(size_t k, PyObject* value) const {
    if (value != values_[k].ptr()) return false;
#ifdef FROZENOPT_DICT_VERSIONS
    return !PyDict_Check(value) || version_of(value) == versions_[k];
#else
    const size_t begin = k == 0 ? 0 : entry_ends_[k - 1], end = entry_ends_[k];
    if (!PyDict_Check(value)) return begin == end;
    if (PyDict_GET_SIZE(value) != static_cast<Py_ssize_t>(end - begin)) return false;
    Py_ssize_t pos = 0;
    PyObject *name, *entry;
    for (size_t i = begin; PyDict_Next(value, &pos, &name, &entry); ++i) {
      if (name != entry_keys_[i].ptr() || entry != entry_values_[i].ptr()) return false;
    }
    return true;
#endif
  }

  bool valid_ = false;
  bool follow_requires_grad_ = false;
  py::object groups_, state_;
  std::vector<py::object> group_dicts_, param_lists_;
  std::vector<py::object> params_;   // every group's params, in order
  std::vector<char> requires_grad_;  // parallel to params_
  std::vector<size_t> group_ends_;   // group g's params end at params_[group_ends_[g]]
  std::unordered_map<PyObject*, int64_t> group_of_;
  std::vector<py::object> keys_, values_;              // the state dict's items, in order
  uint64_t state_version_ = 0;                         // with dict versions: the state dict's ...
  std::vector<uint64_t> versions_;                     // ... and each item's
  std::vector<py::object> entry_keys_, entry_values_;  // without: each item's own items, concatenated
  std::vector<size_t> entry_ends_;                     // state item k's entries end at entry_ends_[k]
};

}  // namespace

void bind_watch(py::module_& m) {
  py::class_<Watch>(m, "Watch", "What an optimizer's plans were built from, checked at each step")
      .def(py::init<>())
      .def("snapshot", &Watch::snapshot, py::arg("param_groups"), py::arg("state"), py::arg("follow_requires_grad"))
      .def("stale", &Watch::stale, py::arg("param_groups"), py::arg("state"))
      .def("clear", &Watch::clear);
}

}  // namespace frozenopt
