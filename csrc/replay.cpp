// The executor of a recorded fused run (resnet_fused/replay.py): the plan's ops called through the
// dispatcher from C++, so that a replayed forward runs no Python between its ops.
//
// Each step holds its operator's handle and its whole argument stack, built once from the recorded
// arguments (a tensor the call makes is a hole, filled from the step's slots when it runs). Python's
// executor paid several microseconds a step to turn its arguments into that stack again; here a step
// costs a copy of the stack and the dispatch. The plan also checks the tensors it relies on (their
// versions and data pointers), which read in Python cost about as much as the dispatch saved.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace resnet_fused {
namespace {

using at::Tensor;
using c10::IValue;

// The GIL let go while the plan runs (a forward takes milliseconds; other Python threads run on),
// where the caller holds it.
class GilRelease {
 public:
  GilRelease() : state_(Py_IsInitialized() && PyGILState_Check() ? PyEval_SaveThread() : nullptr) {}
  ~GilRelease() {
    if (state_) PyEval_RestoreThread(state_);
  }
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;

 private:
  PyThreadState* state_;
};

// How an op's result is used (replay.py's step kinds).
enum Kind : int64_t { kNothing = 0, kTensor = 1, kValue = 2, kTensors = 3 };

struct Step {
  c10::OperatorHandle op;
  std::vector<IValue> args;                       // the whole stack, holes where dyn fills
  std::vector<std::pair<int64_t, int64_t>> dyn;   // (argument position, slot)
  int64_t kind;
  IValue expect;                                  // kValue: the value the recording returned
  std::vector<std::pair<int64_t, int64_t>> dest;  // kTensor: (0, slot); kTensors: (index, slot)
  std::vector<int64_t> dead;                      // slots no later step reads
  bool multiple_returns;                          // kTensors: returned as several values, not a list
};

std::vector<std::pair<int64_t, int64_t>> pairs(const std::vector<int64_t>& flat, const char* what) {
  TORCH_CHECK_VALUE(flat.size() % 2 == 0, "resnet_fused.ReplayPlan: ", what, " must hold pairs, got ",
                    flat.size(), " values");
  std::vector<std::pair<int64_t, int64_t>> out;
  for (size_t i = 0; i < flat.size(); i += 2) out.emplace_back(flat[i], flat[i + 1]);
  return out;
}

bool same_value(const IValue& a, const IValue& b) {
  if (a.isBool() && b.isBool()) return a.toBool() == b.toBool();
  if (a.isInt() && b.isInt()) return a.toInt() == b.toInt();
  if (a.isDouble() && b.isDouble()) return a.toDouble() == b.toDouble();
  return false;
}

struct ReplayPlan : torch::CustomClassHolder {
  std::vector<Step> steps;
  int64_t nslots = 1, out = 0;
  // (tensor, version or -1 where unchecked, data pointer or -1 where unchecked): replay.py's guards
  std::vector<std::tuple<Tensor, int64_t, int64_t>> guards;

  // One step: the op `name` ("ns::op"), overload `overload`, its whole argument stack `args`
  // (schema order, defaults filled), the (position, slot) pairs filled at run time, what its result
  // is (kind, the expected value for kValue, the (index, slot) pairs for kTensor / kTensors) and
  // the slots let go after it.
  void add_step(const std::string& name, const std::string& overload, std::vector<IValue> args,
                const std::vector<int64_t>& dyn, int64_t kind, IValue expect, const std::vector<int64_t>& dest,
                std::vector<int64_t> dead) {
    auto op = c10::Dispatcher::singleton().findSchema({name, overload});
    TORCH_CHECK_VALUE(op.has_value(), "resnet_fused.ReplayPlan: no operator ", name, ".", overload);
    const auto& schema = op->schema();
    TORCH_CHECK_VALUE(args.size() == schema.arguments().size(), "resnet_fused.ReplayPlan: ", name, ".", overload,
                      " takes ", schema.arguments().size(), " arguments, got ", args.size());
    TORCH_CHECK_VALUE(kind >= kNothing && kind <= kTensors, "resnet_fused.ReplayPlan: unknown step kind ", kind);
    auto d = pairs(dyn, "dyn");
    for (const auto& [pos, slot] : d) {
      TORCH_CHECK_VALUE(pos >= 0 && pos < int64_t(args.size()) && slot >= 0 && slot < nslots,
                        "resnet_fused.ReplayPlan: argument ", pos, " from slot ", slot, " is out of range");
    }
    auto ds = pairs(dest, "dest");
    const bool multiple = schema.returns().size() > 1;
    TORCH_CHECK_VALUE(kind != kTensor || (ds.size() == 1 && ds[0].first == 0),
                      "resnet_fused.ReplayPlan: a step of one tensor gives it to one slot");
    for (const auto& [i, slot] : ds) {
      TORCH_CHECK_VALUE(slot > 0 && i >= 0 && (!multiple || i < int64_t(schema.returns().size())),
                        "resnet_fused.ReplayPlan: bad result ", i, " to slot ", slot);
      nslots = std::max(nslots, slot + 1);
    }
    if (kind == kValue) {
      TORCH_CHECK_VALUE(expect.isBool() || expect.isInt() || expect.isDouble(),
                        "resnet_fused.ReplayPlan: a checked value must be a bool, int or float");
    }
    for (int64_t s : dead) TORCH_CHECK_VALUE(s >= 0 && s < nslots, "resnet_fused.ReplayPlan: bad dead slot ", s);
    steps.push_back(Step{*op, std::move(args), std::move(d), kind, std::move(expect), std::move(ds), std::move(dead),
                         multiple});
  }

  void set_output(int64_t slot) {
    TORCH_CHECK_VALUE(slot >= 0 && slot < nslots, "resnet_fused.ReplayPlan: bad output slot ", slot);
    out = slot;
  }

  // Guard t: its version (check_version) and its data pointer (check_data) must stay as they are now.
  void add_guard(Tensor t, bool check_version, bool check_data) {
    TORCH_CHECK_VALUE(!check_version || !t.is_inference(), "resnet_fused.ReplayPlan: an inference tensor has no version");
    TORCH_CHECK_VALUE(!check_data || t.has_storage(), "resnet_fused.ReplayPlan: this tensor has no data pointer");
    const int64_t version = check_version ? int64_t(t._version()) : -1;
    const int64_t data = check_data ? reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()->data()) : -1;
    guards.emplace_back(std::move(t), version, data);
  }

  // Whether every tensor the plan relies on keeps its version and its data.
  bool unchanged() const {
    for (const auto& [t, version, data] : guards) {
      if (version != -1 && (t.is_inference() || int64_t(t._version()) != version)) return false;
      if (data != -1 && reinterpret_cast<int64_t>(t.unsafeGetTensorImpl()->data()) != data) return false;
    }
    return true;
  }

  // The recorded ops on x; None where a checked value differed from the recording's (the caller
  // then takes the module path).
  std::optional<Tensor> run(const Tensor& x) const {
    GilRelease no_gil;
    std::vector<IValue> vals(static_cast<size_t>(nslots));
    vals[0] = x;
    torch::jit::Stack stack;
    for (const Step& s : steps) {
      stack = s.args;
      for (const auto& [pos, slot] : s.dyn) stack[size_t(pos)] = vals[size_t(slot)];
      s.op.callBoxed(stack);
      switch (s.kind) {
        case kTensor:
          vals[size_t(s.dest[0].second)] = std::move(stack[0]);
          break;
        case kValue:
          if (!same_value(stack[0], s.expect)) return std::nullopt;
          break;
        case kTensors:
          if (s.multiple_returns) {
            for (const auto& [i, slot] : s.dest) vals[size_t(slot)] = std::move(stack[size_t(i)]);
          } else {
            const auto list = stack[0].toList();
            for (const auto& [i, slot] : s.dest) vals[size_t(slot)] = list.get(size_t(i));
          }
          break;
        default:
          break;
      }
      stack.clear();
      for (int64_t d : s.dead) vals[size_t(d)] = IValue();
    }
    return vals[size_t(out)].toTensor();
  }

  int64_t num_steps() const { return int64_t(steps.size()); }
};

TORCH_LIBRARY_FRAGMENT(resnet_fused, m) {
  m.class_<ReplayPlan>("ReplayPlan")
      .def(torch::init<>())
      .def("add_step", &ReplayPlan::add_step)
      .def("set_output", &ReplayPlan::set_output)
      .def("add_guard", &ReplayPlan::add_guard)
      .def("unchanged", &ReplayPlan::unchanged)
      .def("run", &ReplayPlan::run)
      .def("num_steps", &ReplayPlan::num_steps);
}

}  // namespace
}  // namespace resnet_fused
