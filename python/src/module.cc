// The Python binding of the worker library: shardps._shardps (python/shardps wraps it; docs/
// python.md). pybind11 from Debian, so that the module is built against Debian's Python and
// used beside Debian's PyTorch with nothing from PyPI.
//
// Arrays cross without copies: the caller's float32 buffer is what the worker writes from and
// reads into. A Handle holds a reference to every array its operation uses until the operation
// completed; one dropped before that waits for it first (the memory stays valid meanwhile). The
// GIL is released whenever C++ may block.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include <chrono>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "shardps/worker.h"

extern char** environ;

namespace py = pybind11;
using namespace std::chrono_literals;

namespace shardps::python {
namespace {

// Raises the package's shardps.Error (a RuntimeError), or shardps.TimeoutError (also the
// builtin TimeoutError) for a timeout, with the status text and its code. The classes are the
// package's (python/shardps/__init__.py), looked up when an error is raised: no state here.
[[noreturn]] void Raise(const Status& st) {
  py::object type = py::module_::import("shardps").attr(st.IsTimeout() ? "TimeoutError" : "Error");
  py::object exc = type(st.ToString());
  exc.attr("code") = Status::CodeName(st.code());
  PyErr_SetObject(type.ptr(), exc.ptr());
  throw py::error_already_set();
}

template <typename T>
T Check(Result<T> r) {
  if (!r.ok()) Raise(r.status());
  return std::move(r).value();
}

// A float32, C-contiguous array of exactly `numel` elements (writable when `write`), through
// the buffer protocol; ValueError saying what is wrong otherwise.
float* FloatBuffer(const py::object& array, uint64_t numel, bool write, const std::string& tensor,
                   const char* what) {
  Py_buffer view;
  int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (write ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(array.ptr(), &view, flags) != 0) {
    PyErr_Clear();
    // Say which rule it broke.
    Py_buffer loose;
    if (PyObject_GetBuffer(array.ptr(), &loose, PyBUF_STRIDED_RO | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      throw py::value_error(tensor + ": the " + what +
                            " must be a float32 array (numpy.ndarray or torch.Tensor on the CPU)");
    }
    bool readonly = loose.readonly;
    PyBuffer_Release(&loose);
    if (write && readonly) throw py::value_error(tensor + ": the " + what + " array is read-only");
    throw py::value_error(tensor + ": the " + what + " array is not C-contiguous");
  }
  std::string format = view.format ? view.format : "B";
  Py_ssize_t itemsize = view.itemsize;
  Py_ssize_t len = view.len;
  void* buf = view.buf;
  PyBuffer_Release(&view);  // the caller keeps `array` alive, and with it the memory
  if (!(format == "f" || format == "<f" || format == "=f") || itemsize != 4)
    throw py::value_error(tensor + ": the " + what + " must be float32, not format '" + format +
                          "'");
  if (static_cast<uint64_t>(len) != numel * 4)
    throw py::value_error(tensor + ": the " + what + " has " + std::to_string(len / itemsize) +
                          " elements; the tensor has " + std::to_string(numel));
  return static_cast<float*>(buf);
}

class PyHandle {
 public:
  PyHandle(Handle h, std::vector<py::object> keep, std::chrono::milliseconds drop_wait)
      : h_(std::move(h)), keep_(std::move(keep)), drop_wait_(drop_wait) {}
  PyHandle(const PyHandle&) = delete;
  ~PyHandle() {
    // The arrays must outlive the operation: a handle dropped first waits for it (without the
    // GIL), and if it still has not completed, the arrays are leaked rather than freed under it.
    if (!keep_.empty() && !h_.done()) {
      bool done;
      {
        py::gil_scoped_release nogil;
        done = h_.Wait(drop_wait_).ok() || h_.done();
      }
      if (!done)
        for (auto& o : keep_) o.release();  // leak: the operation may still write there
    }
  }
  void Wait(std::optional<double> timeout_s) {
    auto timeout = timeout_s ? std::chrono::milliseconds(static_cast<int64_t>(*timeout_s * 1000))
                             : std::chrono::milliseconds(24h);
    Status st;
    {
      py::gil_scoped_release nogil;
      st = h_.Wait(timeout);
    }
    if (!st.ok()) Raise(st);
    keep_.clear();  // complete: the arrays are the caller's again
  }
  bool done() const { return h_.done(); }
  uint64_t version() const { return h_.version(); }
  bool late() const { return h_.late(); }

 private:
  Handle h_;
  std::vector<py::object> keep_;
  std::chrono::milliseconds drop_wait_;
};

class PyWorker {
 public:
  explicit PyWorker(std::unique_ptr<Worker> w, std::chrono::milliseconds rpc_timeout)
      : w_(std::move(w)), rpc_timeout_(rpc_timeout) {}

  static std::unique_ptr<PyWorker> FromEnvironment() {
    auto o = Check(WorkerOptions::FromEnvironment(environ));
    if (o.coordinator.empty())
      Raise(Status::InvalidArgument(
          "SHARDPS_COORDINATOR is not set: run under `shardps launch` (or `shardps run`), or "
          "use Worker.connect(coordinator=...)"));
    return Connect(o);
  }
  static std::unique_ptr<PyWorker> ConnectTo(const std::string& coordinator, int32_t rank,
                                             const std::string& transport) {
    auto o = Check(WorkerOptions::FromEnvironment(environ));
    o.coordinator = coordinator;
    o.rank = rank;
    if (!transport.empty()) o.transport = transport;
    return Connect(o);
  }
  static std::unique_ptr<PyWorker> Connect(const WorkerOptions& o) {
    Result<std::unique_ptr<Worker>> w = Status::Internal("not connected");
    {
      py::gil_scoped_release nogil;
      w = Worker::Connect(o);
    }
    return std::make_unique<PyWorker>(Check(std::move(w)), o.rpc_timeout);
  }

  uint32_t Declare(const std::string& name, std::vector<int64_t> shape,
                   const std::string& optimizer, float lr, float weight_decay, float momentum,
                   bool nesterov, float beta1, float beta2, float eps, const py::object& init,
                   float init_value, const std::string& compression, const std::string& pull) {
    TensorSpec spec;
    spec.name = name;
    spec.shape = std::move(shape);
    spec.optimizer.kind = Check(ParseOptimizer(optimizer));
    spec.optimizer.lr = lr;
    spec.optimizer.weight_decay = weight_decay;
    spec.optimizer.momentum = momentum;
    spec.optimizer.nesterov = nesterov;
    spec.optimizer.beta1 = beta1;
    spec.optimizer.beta2 = beta2;
    spec.optimizer.eps = eps;
    spec.init_value = init_value;
    if (spec.numel() == 0)
      throw py::value_error(name + ": the shape must have positive dimensions");
    if (!init.is_none()) spec.init = FloatBuffer(init, spec.numel(), false, name, "initial value");
    spec.compression = Check(Compression::Parse(compression));
    auto pc = Check(Compression::Parse(pull));
    if (pc.codec != Codec::kNone && pc.codec != Codec::kFp16 && pc.codec != Codec::kBf16)
      throw py::value_error(name + ": pulls are fp32 ('none'), 'fp16' or 'bf16', not '" + pull +
                            "'");
    spec.pull_codec = pc.codec;
    Result<TensorId> id = Status::Internal("not declared");
    {
      py::gil_scoped_release nogil;
      id = w_->Declare(spec);
    }
    TensorId t = Check(std::move(id));
    if (names_.size() <= t) names_.resize(t + 1);
    names_[t] = name;
    return t;
  }

  PyHandle* Push(uint32_t id, const py::object& grad) { return Start(id, &grad, nullptr); }
  PyHandle* Pull(uint32_t id, const py::object& out) { return Start(id, nullptr, &out); }
  PyHandle* PushPull(uint32_t id, const py::object& grad, const py::object& out) {
    return Start(id, &grad, &out);
  }

  void Barrier(const std::string& name, double timeout_s) {
    Status st;
    {
      py::gil_scoped_release nogil;
      st = w_->Barrier(name, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    }
    if (!st.ok()) Raise(st);
  }
  void Checkpoint(const std::string& dir, double timeout_s) {
    Status st;
    {
      py::gil_scoped_release nogil;
      st = w_->Checkpoint(dir, std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000)));
    }
    if (!st.ok()) Raise(st);
  }
  void Finish() {
    Status st;
    {
      py::gil_scoped_release nogil;
      st = w_->Finish();
    }
    if (!st.ok()) Raise(st);
  }
  std::string ServerStats(uint32_t server) {
    Result<std::string> r = Status::Internal("no stats");
    {
      py::gil_scoped_release nogil;
      r = w_->ServerStats(server);
    }
    return Check(std::move(r));
  }
  void SetLearningRate(uint32_t id, float lr) {
    if (Status st = w_->SetLearningRate(id, lr); !st.ok()) Raise(st);
  }
  uint64_t Numel(uint32_t id) const { return w_->numel(id); }
  uint64_t Steps(uint32_t id) const { return w_->steps(id); }
  Worker& worker() { return *w_; }

 private:
  const std::string& NameOf(uint32_t id) {
    static const std::string unknown = "tensor";
    return id < names_.size() ? names_[id] : unknown;
  }
  PyHandle* Start(uint32_t id, const py::object* grad, const py::object* out) {
    uint64_t n = w_->numel(id);
    if (n == 0) Raise(Status::NotFound("unknown tensor id " + std::to_string(id)));
    const std::string& name = NameOf(id);
    const float* g = grad ? FloatBuffer(*grad, n, false, name, "gradient") : nullptr;
    float* o = out ? FloatBuffer(*out, n, true, name, "output") : nullptr;
    std::vector<py::object> keep;
    if (grad) keep.push_back(*grad);
    if (out) keep.push_back(*out);
    Handle h;
    {
      py::gil_scoped_release nogil;  // a compressed push encodes here; credits may wait
      h = g && o ? w_->PushPull(id, g, o) : g ? w_->Push(id, g) : w_->Pull(id, o);
    }
    return new PyHandle(std::move(h), std::move(keep), rpc_timeout_ * 2);
  }

  std::unique_ptr<Worker> w_;
  std::chrono::milliseconds rpc_timeout_;
  std::vector<std::string> names_;
};

}  // namespace
}  // namespace shardps::python

PYBIND11_MODULE(_shardps, m) {
  using namespace shardps;
  using namespace shardps::python;
  m.doc() = "ShardPS worker library (use the shardps package)";
  py::class_<PyHandle>(m, "Handle")
      .def("wait", &PyHandle::Wait, py::arg("timeout") = py::none(),
           "Waits for the operation (seconds; None: no bound); raises on its error")
      .def("done", &PyHandle::done)
      .def_property_readonly("version", &PyHandle::version)
      .def_property_readonly("late", &PyHandle::late);
  py::class_<PyWorker>(m, "Worker")
      .def_static("from_environment", &PyWorker::FromEnvironment)
      .def_static("connect", &PyWorker::ConnectTo, py::arg("coordinator"), py::arg("rank") = -1,
                  py::arg("transport") = "")
      .def("_declare", &PyWorker::Declare)
      .def("_push", &PyWorker::Push, py::return_value_policy::take_ownership)
      .def("_pull", &PyWorker::Pull, py::return_value_policy::take_ownership)
      .def("_push_pull", &PyWorker::PushPull, py::return_value_policy::take_ownership)
      .def("barrier", &PyWorker::Barrier, py::arg("name"), py::arg("timeout") = 60.0)
      .def("checkpoint", &PyWorker::Checkpoint, py::arg("dir"), py::arg("timeout") = 600.0)
      .def("finish", &PyWorker::Finish)
      .def("server_stats", &PyWorker::ServerStats)
      .def("_set_learning_rate", &PyWorker::SetLearningRate)
      .def("numel", &PyWorker::Numel)
      .def("steps", &PyWorker::Steps)
      .def_property_readonly("rank", [](PyWorker& w) { return w.worker().rank(); })
      .def_property_readonly("rejoined", [](PyWorker& w) { return w.worker().rejoined(); })
      .def_property_readonly("num_workers", [](PyWorker& w) { return w.worker().num_workers(); })
      .def_property_readonly("num_servers", [](PyWorker& w) { return w.worker().num_servers(); })
      .def_property_readonly("mode", [](PyWorker& w) { return ModeName(w.worker().mode()); });
}
