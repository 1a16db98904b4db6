// pybind11 bindings of the framework-free kernels in csrc/ as the module nfkernels._C.
// Tensors arrive as integers (data_ptr()), the stream as torch's cuda_stream handle; the
// Python side (nfkernels.ops.agc / sgd_agc) has validated shapes, dtypes and devices. No
// libtorch: the module links only the static CUDA runtime, so it imports without a GPU.
#include <cstdint>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "../csrc/nfkernels.h"

namespace py = pybind11;

namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("nfkernels._C.") + what + ": CUDA error: " + cudaGetErrorString(err));
  }
}

// Raises the clear "no CUDA device" error on machines without a GPU or driver, then makes
// `device` current (torch's current device lives in the same driver context).
void use_device(const char* what, int device) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky error so a later call can retry
    throw std::runtime_error(std::string("nfkernels._C.") + what + ": no CUDA device is available (" +
                             (err != cudaSuccess ? cudaGetErrorString(err) : "cudaGetDeviceCount returned 0") +
                             "); the 'cuda' backend needs a GPU and its driver");
  }
  if (device < 0 || device >= count) {
    throw std::invalid_argument(std::string("nfkernels._C.") + what + ": device index " + std::to_string(device) +
                                " out of range (" + std::to_string(count) + " devices)");
  }
  check(cudaSetDevice(device), what);
}

nfk::DType parse_dtype(const char* what, const std::string& name) {
  if (name == "float16") return nfk::DType::kFloat16;
  if (name == "bfloat16") return nfk::DType::kBFloat16;
  if (name == "float32") return nfk::DType::kFloat32;
  if (name == "float64") return nfk::DType::kFloat64;
  throw py::type_error(std::string("nfkernels._C.") + what + ": dtype must be float16, bfloat16, float32 or float64; got " + name);
}

template <typename T>
T* ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nfkernels CUDA kernels (framework-free csrc/ bound with pybind11; pointers passed as ints)";

  m.def("device_count", []() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  }, "Number of CUDA devices this module's runtime sees (0 without a GPU or driver).");

  m.def("cuda_runtime_version", []() {
    int version = 0;
    check(cudaRuntimeGetVersion(&version), "cuda_runtime_version");
    return version;
  }, "CUDA runtime version the module was built with (e.g. 13000).");

  m.def(
      "agc",
      [](std::uintptr_t grad, std::uintptr_t weight, std::uintptr_t table, std::int64_t n_units,
         const std::string& dtype, double clip_factor, double eps, int device, std::uintptr_t stream) {
        use_device("agc", device);
        const nfk::DType type = parse_dtype("agc", dtype);
        check(nfk::agc(type, ptr<void>(grad), ptr<const void>(weight), ptr<const std::int64_t>(table), n_units,
                       static_cast<float>(clip_factor), static_cast<float>(eps), ptr<CUstream_st>(stream)),
              "agc");
      },
      py::arg("grad"), py::arg("weight"), py::arg("table"), py::arg("n_units"), py::arg("dtype"),
      py::arg("clip_factor"), py::arg("eps"), py::arg("device"), py::arg("stream"),
      "Unit-wise AGC of every row of a (n_units, 3) int64 table (grad offset, weight offset, length),\n"
      "in place on grad, in one launch on `stream` of `device`.");

  m.def(
      "sgd_agc",
      [](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t momentum_buffer, std::uintptr_t table,
         std::int64_t n_rows, const std::string& dtype, double lr, double momentum, double weight_decay,
         double clip_factor, double eps, bool clip, bool has_momentum, bool first_step, bool nesterov, int device,
         std::uintptr_t stream) {
        use_device("sgd_agc", device);
        const nfk::DType type = parse_dtype("sgd_agc", dtype);
        const nfk::SgdAgcOptions options{static_cast<float>(lr), static_cast<float>(momentum),
                                         static_cast<float>(weight_decay), static_cast<float>(clip_factor),
                                         static_cast<float>(eps), clip, has_momentum, first_step, nesterov};
        check(nfk::sgd_agc(type, ptr<void>(param), ptr<const void>(grad), ptr<void>(momentum_buffer),
                           ptr<const std::int64_t>(table), n_rows, options, ptr<CUstream_st>(stream)),
              "sgd_agc");
      },
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("table"), py::arg("n_rows"),
      py::arg("dtype"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("clip_factor"),
      py::arg("eps"), py::arg("clip"), py::arg("has_momentum"), py::arg("first_step"), py::arg("nesterov"),
      py::arg("device"), py::arg("stream"),
      "SGD (nesterov optional) with AGC over a (n_rows, 4) int64 table (param, grad, buffer offsets,\n"
      "length), updating param and momentum_buffer in one launch on `stream` of `device`.");
}
