// pybind11 bindings of the framework-free kernels in csrc/ as the module nfkernels._C.
// Tensors arrive as integers (data_ptr(), 0 for an absent operand), dtypes as names, the stream
// as torch's cuda_stream handle; the Python side (nfkernels.ops.*) has validated shapes, dtypes
// and devices and allocated every output and workspace. No
// libtorch: the module links only the static CUDA runtime, so it imports without a GPU.
// Every call that reaches the driver releases the GIL (py::call_guard), so other Python threads
// run during launches; those calls' bodies touch no Python object: pybind11 has converted the
// arguments before the guard, and re-acquires the GIL before translating a thrown exception.
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

// Makes `device` current for one launch and restores the caller's device on every exit, a
// thrown error included: the current device lives in the driver context torch shares, so a
// switch left behind would send torch's later allocations, streams and synchronize to the wrong
// GPU. Raises the clear "no CUDA device" error on machines without a GPU or driver.
class DeviceGuard {
 public:
  DeviceGuard(const char* what, int device) {
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
    check(cudaGetDevice(&previous_), what);
    if (previous_ != device) {  // a needless switch costs a driver call on every launch
      check(cudaSetDevice(device), what);
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // a destructor must not throw; previous_ was current a moment ago
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

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

// A per-channel parameter: absent (address 0, dtype ""), in the activation dtype, or float32
// (autocast keeps parameters fp32 next to fp16/bf16 activations).
nfk::ChannelParam channel_param(const char* what, const char* name, std::uintptr_t address, const std::string& dtype,
                                const std::string& act_dtype) {
  if (address == 0) return nfk::ChannelParam{nullptr, false};
  if (dtype != act_dtype && dtype != "float32") {
    throw py::type_error(std::string("nfkernels._C.") + what + ": " + name + " must have dtype " + act_dtype +
                         " or float32; got '" + dtype + "'");
  }
  return nfk::ChannelParam{ptr<const void>(address), dtype == "float32"};
}

nfk::Activation parse_activation(const char* what, const std::string& name) {
  static const std::pair<const char*, nfk::Activation> table[] = {
      {"gelu", nfk::Activation::kGelu},         {"gelu_tanh", nfk::Activation::kGeluTanh},
      {"relu", nfk::Activation::kRelu},         {"silu", nfk::Activation::kSilu},
      {"relu6", nfk::Activation::kRelu6},       {"elu", nfk::Activation::kElu},
      {"celu", nfk::Activation::kElu},          {"leaky_relu", nfk::Activation::kLeakyRelu},
      {"selu", nfk::Activation::kSelu},         {"sigmoid", nfk::Activation::kSigmoid},
      {"tanh", nfk::Activation::kTanh},         {"softplus", nfk::Activation::kSoftplus},
      {"softsign", nfk::Activation::kSoftsign}, {"log_sigmoid", nfk::Activation::kLogSigmoid},
      {"identity", nfk::Activation::kIdentity},
  };
  for (const auto& [key, act] : table) {
    if (name == key) return act;
  }
  throw py::value_error(std::string("nfkernels._C.") + what + ": unknown activation " + name);
}

nfk::MatrixView matrix_view(const char* what, std::int64_t rows, std::int64_t cols, std::int64_t channels,
                            bool channel_on_rows) {
  if (rows < 0 || cols <= 0 || channels <= 0 || (channel_on_rows && rows % channels != 0)) {
    throw std::invalid_argument(std::string("nfkernels._C.") + what + ": invalid matrix view (rows " +
                                std::to_string(rows) + ", cols " + std::to_string(cols) + ", channels " +
                                std::to_string(channels) + ")");
  }
  return nfk::MatrixView{rows, cols, channels, channel_on_rows};
}

nfk::SeShape se_shape(const char* what, std::int64_t n, std::int64_t c, std::int64_t hw, bool channels_last) {
  if (n < 0 || c <= 0 || hw <= 0) {
    throw std::invalid_argument(std::string("nfkernels._C.") + what + ": invalid shape (n " + std::to_string(n) +
                                ", c " + std::to_string(c) + ", hw " + std::to_string(hw) + ")");
  }
  return nfk::SeShape{n, c, hw, channels_last};
}

std::int64_t se_min_blocks(const char* what, std::int64_t min_blocks) {
  if (min_blocks < 1) {
    throw std::invalid_argument(std::string("nfkernels._C.") + what + ": min_blocks must be at least 1, got " +
                                std::to_string(min_blocks));
  }
  return min_blocks;
}

// The split count a reduction launch is given must be its plan's: its workspace was sized by it.
void se_check_splits(const char* what, nfk::DType type, const nfk::SeShape& shape, std::int64_t min_blocks,
                     std::int64_t splits, bool has_workspace) {
  const std::int64_t planned = nfk::se_reduce_splits(type, shape, min_blocks);
  if (splits != planned || (splits > 1 && !has_workspace)) {
    throw std::invalid_argument(std::string("nfkernels._C.") + what + ": splits " + std::to_string(splits) +
                                (splits == planned ? " need a workspace" : " are not se_reduce_splits' " +
                                                                               std::to_string(planned)));
  }
}

// The gate operands of the se_gate_* kernels (nfk::SeGate); skip_gain is one value in the
// activation dtype or float32.
nfk::SeGate se_gate(const char* what, std::uintptr_t logits, std::uintptr_t mask, std::uintptr_t skip_gain,
                    const std::string& skip_gain_dtype, const std::string& dtype, double gain) {
  return nfk::SeGate{ptr<const void>(logits), ptr<const void>(mask),
                     channel_param(what, "skip_gain", skip_gain, skip_gain_dtype, dtype), gain};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "nfkernels CUDA kernels (framework-free csrc/ bound with pybind11; pointers passed as ints)";

  m.def(
      "device_count",
      []() {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
          cudaGetLastError();
          return 0;
        }
        return count;
      },
      py::call_guard<py::gil_scoped_release>(),
      "Number of CUDA devices this module's runtime sees (0 without a GPU or driver).");

  m.def(
      "cuda_runtime_version",
      []() {
        int version = 0;
        check(cudaRuntimeGetVersion(&version), "cuda_runtime_version");
        return version;
      },
      py::call_guard<py::gil_scoped_release>(), "CUDA runtime version the module was built with (e.g. 13000).");

  m.def(
      "agc",
      [](std::uintptr_t grad, std::uintptr_t weight, std::uintptr_t rows, std::uintptr_t bases, std::int64_t n_units,
         std::int64_t n_singles, std::int64_t row_cols, const std::string& grad_dtype, const std::string& weight_dtype,
         double clip_factor, double eps, int device, std::uintptr_t stream) {
        const char* what = "agc";
        const nfk::DType g_type = parse_dtype(what, grad_dtype), w_type = parse_dtype(what, weight_dtype);
        const DeviceGuard guard(what, device);
        check(nfk::agc(g_type, w_type, ptr<void>(grad), ptr<const void>(weight), ptr<const std::int64_t>(rows),
                       ptr<const std::int64_t>(bases), n_units, n_singles, row_cols, clip_factor, eps,
                       ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("grad"), py::arg("weight"), py::arg("rows"), py::arg("bases"), py::arg("n_units"),
      py::arg("n_singles"), py::arg("row_cols"), py::arg("grad_dtype"), py::arg("weight_dtype"),
      py::arg("clip_factor"), py::arg("eps"), py::arg("device"), py::arg("stream"),
      "Unit-wise AGC of every unit row, in place on grad, in one launch on `stream` of `device`: `rows`\n"
      "(n_units, 3) int64 (tensor, first element in it, length; the n_singles one-element units first,\n"
      "then by decreasing length), `bases` (n_tensors, 2) int64 (grad and weight offsets of each\n"
      "tensor), row_cols the rows' block width (a power of two). grad and weight dtypes may differ.");

  m.def(
      "sgd_agc",
      [](std::uintptr_t param, std::uintptr_t grad, std::uintptr_t momentum_buffer, std::uintptr_t rows,
         std::uintptr_t bases, std::int64_t n_units, std::int64_t n_singles, std::int64_t row_cols,
         const std::string& param_dtype, const std::string& grad_dtype, double lr, double momentum,
         double weight_decay, double clip_factor, double eps, bool clip, bool has_momentum, bool nesterov, int device,
         std::uintptr_t stream) {
        const char* what = "sgd_agc";
        const nfk::DType p_type = parse_dtype(what, param_dtype), g_type = parse_dtype(what, grad_dtype);
        const nfk::SgdAgcOptions options{lr, momentum, weight_decay, clip_factor, eps, clip, has_momentum, nesterov};
        const DeviceGuard guard(what, device);
        check(nfk::sgd_agc(p_type, g_type, ptr<void>(param), ptr<const void>(grad), ptr<void>(momentum_buffer),
                           ptr<const std::int64_t>(rows), ptr<const std::int64_t>(bases), n_units, n_singles,
                           row_cols, options, ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("param"), py::arg("grad"), py::arg("momentum_buffer"), py::arg("rows"), py::arg("bases"),
      py::arg("n_units"), py::arg("n_singles"), py::arg("row_cols"),
      py::arg("param_dtype"), py::arg("grad_dtype"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"),
      py::arg("clip_factor"), py::arg("eps"), py::arg("clip"), py::arg("has_momentum"), py::arg("nesterov"),
      py::arg("device"), py::arg("stream"),
      "SGD (nesterov optional) with AGC over every unit row (`rows`, n_singles and row_cols as for agc;\n"
      "`bases` (n_tensors, 3)\n"
      "int64: param, grad and buffer offsets of each tensor), updating param and momentum_buffer\n"
      "(param_dtype) in one launch on `stream` of `device`. grad's dtype may differ from param's.");

  m.def(
      "weight_standardize_fwd",
      [](std::uintptr_t weight, std::uintptr_t gain, std::uintptr_t out, std::uintptr_t mean, std::uintptr_t s0,
         std::uintptr_t q, std::int64_t n_rows, std::int64_t row_len, const std::string& weight_dtype,
         const std::string& out_dtype, double gamma_scaled, double eps, bool deepmind, int device,
         std::uintptr_t stream) {
        const char* what = "weight_standardize_fwd";
        const nfk::DType w_type = parse_dtype(what, weight_dtype), o_type = parse_dtype(what, out_dtype);
        const DeviceGuard guard(what, device);
        check(nfk::weight_standardize_fwd(w_type, o_type,
                                          ptr<const void>(weight), ptr<const void>(gain), ptr<void>(out),
                                          ptr<void>(mean), ptr<void>(s0), ptr<void>(q), n_rows, row_len, gamma_scaled,
                                          eps, deepmind, ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("weight"), py::arg("gain"), py::arg("out"), py::arg("mean"), py::arg("s0"), py::arg("q"),
      py::arg("n_rows"), py::arg("row_len"), py::arg("weight_dtype"), py::arg("out_dtype"), py::arg("gamma_scaled"),
      py::arg("eps"), py::arg("deepmind"), py::arg("device"), py::arg("stream"),
      "Scaled Weight Standardization of n_rows dense rows, one block per row: out = (W - mean)*gain*s0\n"
      "in out_dtype, and the per-row mean, s0, q (accumulation dtype) for the backward. gain may be 0.");

  m.def(
      "weight_standardize_bwd",
      [](std::uintptr_t dout, std::uintptr_t weight, std::uintptr_t gain, std::uintptr_t mean, std::uintptr_t s0,
         std::uintptr_t q, std::uintptr_t dweight, std::uintptr_t dgain, std::int64_t n_rows, std::int64_t row_len,
         const std::string& dout_dtype, const std::string& weight_dtype, int device, std::uintptr_t stream) {
        const char* what = "weight_standardize_bwd";
        const nfk::DType d_type = parse_dtype(what, dout_dtype), w_type = parse_dtype(what, weight_dtype);
        const DeviceGuard guard(what, device);
        check(nfk::weight_standardize_bwd(d_type, w_type,
                                          ptr<const void>(dout), ptr<const void>(weight), ptr<const void>(gain),
                                          ptr<const void>(mean), ptr<const void>(s0), ptr<const void>(q),
                                          ptr<void>(dweight), ptr<void>(dgain), n_rows, row_len,
                                          ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("dout"), py::arg("weight"), py::arg("gain"), py::arg("mean"), py::arg("s0"), py::arg("q"),
      py::arg("dweight"), py::arg("dgain"), py::arg("n_rows"), py::arg("row_len"), py::arg("dout_dtype"),
      py::arg("weight_dtype"), py::arg("device"), py::arg("stream"),
      "Backward of weight_standardize_fwd from its saved mean, s0, q: dweight (weight's dtype) and, when\n"
      "dgain is not 0, dgain (accumulation dtype). gain may be 0.");

  m.def(
      "scaled_act_fwd",
      [](std::uintptr_t x, std::uintptr_t bias, std::uintptr_t y, std::int64_t rows, std::int64_t cols,
         std::int64_t channels, bool channel_on_rows, const std::string& dtype,
         const std::string& bias_dtype, const std::string& act, double coeff, int device,
         std::uintptr_t stream) {
        const char* what = "scaled_act_fwd";
        const nfk::MatrixView view = matrix_view(what, rows, cols, channels, channel_on_rows);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::ChannelParam b = channel_param(what, "bias", bias, bias_dtype, dtype);
        const nfk::Activation a = parse_activation(what, act);
        const DeviceGuard guard(what, device);
        check(nfk::scaled_act_fwd(type, a, ptr<const void>(x), b, ptr<void>(y), view, coeff, ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("x"), py::arg("bias"), py::arg("y"), py::arg("rows"), py::arg("cols"), py::arg("channels"),
      py::arg("channel_on_rows"), py::arg("dtype"), py::arg("bias_dtype"), py::arg("act"), py::arg("coeff"),
      py::arg("device"), py::arg("stream"),
      "y = coeff*f(x + b_c) over the (rows, cols) row-major view of x; the channel is row % channels when\n"
      "channel_on_rows, else the column. bias may be 0 (bias_dtype \"\").");

  m.def(
      "scaled_act_bwd_workspace",
      [](std::int64_t rows, std::int64_t cols, std::int64_t channels, bool channel_on_rows, const std::string& dtype) {
        const char* what = "scaled_act_bwd_workspace";
        return nfk::scaled_act_bwd_workspace(parse_dtype(what, dtype),
                                             matrix_view(what, rows, cols, channels, channel_on_rows));
      },
      py::arg("rows"), py::arg("cols"), py::arg("channels"), py::arg("channel_on_rows"), py::arg("dtype"),
      "Accumulation-dtype elements of the workspace scaled_act_bwd needs to compute dbias (no device needed).");

  m.def(
      "scaled_act_bwd",
      [](std::uintptr_t dy, std::uintptr_t x, std::uintptr_t bias, std::uintptr_t dx, std::uintptr_t dbias,
         std::uintptr_t workspace, std::int64_t rows, std::int64_t cols, std::int64_t channels, bool channel_on_rows,
         const std::string& dtype, const std::string& bias_dtype, const std::string& act, double coeff,
         int device, std::uintptr_t stream) {
        const char* what = "scaled_act_bwd";
        const nfk::MatrixView view = matrix_view(what, rows, cols, channels, channel_on_rows);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::ChannelParam b = channel_param(what, "bias", bias, bias_dtype, dtype);
        const nfk::Activation a = parse_activation(what, act);
        if (dbias != 0 && b.data == nullptr) {
          throw std::invalid_argument(std::string("nfkernels._C.") + what + ": dbias needs bias");
        }
        const DeviceGuard guard(what, device);
        check(nfk::scaled_act_bwd(type, a, ptr<const void>(dy), ptr<const void>(x), b, ptr<void>(dx), ptr<void>(dbias),
                                  ptr<void>(workspace), view, coeff, ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("dx"), py::arg("dbias"), py::arg("workspace"),
      py::arg("rows"), py::arg("cols"), py::arg("channels"), py::arg("channel_on_rows"), py::arg("dtype"),
      py::arg("bias_dtype"), py::arg("act"), py::arg("coeff"), py::arg("device"), py::arg("stream"),
      "dx = dy*coeff*f'(x + b_c) and, when dbias is not 0, dbias (bias's dtype) = per-channel sums of dx,\n"
      "deterministic and finished in the kernel (split channel blocks use `workspace`, which may be 0 when\n"
      "scaled_act_bwd_workspace is 0).");

  m.def(
      "se_reduce_splits",
      [](std::int64_t n, std::int64_t c, std::int64_t hw, bool channels_last, const std::string& dtype,
         std::int64_t min_blocks) {
        const char* what = "se_reduce_splits";
        return nfk::se_reduce_splits(parse_dtype(what, dtype), se_shape(what, n, c, hw, channels_last),
                                     se_min_blocks(what, min_blocks));
      },
      py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("dtype"), py::arg("min_blocks"),
      "Splits of hw the SE reductions (se_pool, se_gate_bwd_reduce) make for at least min_blocks blocks (no\n"
      "device needed); those launches take it back and size their workspaces by it.");

  m.def(
      "se_pool",
      [](std::uintptr_t h, std::uintptr_t bias, std::uintptr_t pool, std::uintptr_t partial, std::int64_t min_blocks,
         std::int64_t splits, std::int64_t n, std::int64_t c, std::int64_t hw, bool channels_last,
         const std::string& dtype, const std::string& bias_dtype, int device, std::uintptr_t stream) {
        const char* what = "se_pool";
        const nfk::SeShape shape = se_shape(what, n, c, hw, channels_last);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::ChannelParam b = channel_param(what, "bias", bias, bias_dtype, dtype);
        se_check_splits(what, type, shape, se_min_blocks(what, min_blocks), splits, partial != 0);
        const DeviceGuard guard(what, device);
        check(nfk::se_pool(type, ptr<const void>(h), b, ptr<void>(pool), ptr<void>(partial), min_blocks, splits, shape,
                           ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("h"), py::arg("bias"), py::arg("pool"), py::arg("partial"), py::arg("min_blocks"), py::arg("splits"),
      py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("dtype"), py::arg("bias_dtype"),
      py::arg("device"), py::arg("stream"),
      "pool[n, c] = mean over hw of h + b_c, (n, c) in the accumulation dtype; h dense NCHW or channels_last.\n"
      "splits = se_reduce_splits(..., min_blocks); with splits > 1, partial ((splits, n, c), accumulation\n"
      "dtype) holds the splits' sums, added in split order by a second kernel.");

  m.def(
      "se_gate_fwd",
      [](std::uintptr_t h, std::uintptr_t shortcut, std::uintptr_t logits, std::uintptr_t mask,
         std::uintptr_t skip_gain, const std::string& skip_gain_dtype, double gain, std::uintptr_t bias,
         std::uintptr_t shortcut_bias, std::uintptr_t out, std::int64_t n, std::int64_t c, std::int64_t hw,
         bool channels_last, const std::string& dtype, const std::string& bias_dtype,
         const std::string& shortcut_bias_dtype, int device, std::uintptr_t stream) {
        const char* what = "se_gate_fwd";
        const nfk::SeShape shape = se_shape(what, n, c, hw, channels_last);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::SeGate gate = se_gate(what, logits, mask, skip_gain, skip_gain_dtype, dtype, gain);
        const nfk::ChannelParam b = channel_param(what, "bias", bias, bias_dtype, dtype);
        const nfk::ChannelParam sb = channel_param(what, "shortcut_bias", shortcut_bias, shortcut_bias_dtype, dtype);
        const DeviceGuard guard(what, device);
        check(nfk::se_gate_fwd(type, ptr<const void>(h), ptr<const void>(shortcut), gate, b, sb, ptr<void>(out), shape,
                               ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("h"), py::arg("shortcut"), py::arg("logits"), py::arg("mask"), py::arg("skip_gain"),
      py::arg("skip_gain_dtype"), py::arg("gain"), py::arg("bias"), py::arg("shortcut_bias"), py::arg("out"),
      py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("dtype"), py::arg("bias_dtype"),
      py::arg("shortcut_bias_dtype"), py::arg("device"), py::arg("stream"),
      "out = shortcut + sb_c + coef[n, c]*(h + b_c), coef = k*gain*m[n]*sigmoid(logits[n, c]) formed in the\n"
      "kernel; logits (n, c) and mask (n) in the accumulation dtype, skip_gain k one value; shortcut, logits\n"
      "(no SE: no sigmoid), mask, skip_gain and the biases may be 0. h, shortcut and out share one dense layout.");

  m.def(
      "se_gate_bwd_reduce",
      [](std::uintptr_t dout, std::uintptr_t h, std::uintptr_t bias, std::uintptr_t logits, std::uintptr_t mask,
         std::uintptr_t skip_gain, const std::string& skip_gain_dtype, double gain, std::uintptr_t sums,
         std::uintptr_t dz, std::int64_t min_blocks, std::int64_t splits, std::int64_t n, std::int64_t c,
         std::int64_t hw, bool channels_last, const std::string& dtype, const std::string& bias_dtype, int device,
         std::uintptr_t stream) {
        const char* what = "se_gate_bwd_reduce";
        const nfk::SeShape shape = se_shape(what, n, c, hw, channels_last);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::SeGate gate = se_gate(what, logits, mask, skip_gain, skip_gain_dtype, dtype, gain);
        const nfk::ChannelParam b = channel_param(what, "bias", bias, bias_dtype, dtype);
        se_check_splits(what, type, shape, se_min_blocks(what, min_blocks), splits, true);
        if ((logits == 0) != (dz == 0)) {
          throw std::invalid_argument(std::string("nfkernels._C.") + what + ": dz is given exactly with logits (SE)");
        }
        const nfk::SeGradSums out{ptr<void>(sums), ptr<void>(dz), splits};
        const DeviceGuard guard(what, device);
        check(nfk::se_gate_bwd_reduce(type, ptr<const void>(dout), ptr<const void>(h), b, gate, out, min_blocks, shape,
                                      ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("dout"), py::arg("h"), py::arg("bias"), py::arg("logits"), py::arg("mask"), py::arg("skip_gain"),
      py::arg("skip_gain_dtype"), py::arg("gain"), py::arg("sums"), py::arg("dz"), py::arg("min_blocks"),
      py::arg("splits"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"), py::arg("dtype"),
      py::arg("bias_dtype"), py::arg("device"), py::arg("stream"),
      "sums ((2, splits, n, c), accumulation dtype) = S1 = sum of dout over each split of hw, then\n"
      "S2 = sum of dout*(h + b_c); with SE (else dz is 0) dz (n, c) = S2*k*gain*m[n]*sigmoid(z)*sigmoid(-z)\n"
      "of the whole S2. splits as se_pool's; the gate arguments as in se_gate_fwd.");

  m.def(
      "se_gate_bwd",
      [](std::uintptr_t dout, std::uintptr_t logits, std::uintptr_t mask, std::uintptr_t skip_gain,
         const std::string& skip_gain_dtype, double gain, std::uintptr_t sums, std::uintptr_t dz, std::int64_t splits,
         std::uintptr_t dpool, std::uintptr_t da, std::int64_t rd, std::uintptr_t dh, std::uintptr_t dshortcut_bias,
         std::uintptr_t dbias, std::uintptr_t dskip_partial, std::uintptr_t dfc2_bias, std::uintptr_t dfc1_bias,
         std::int64_t n, std::int64_t c, std::int64_t hw, bool channels_last, const std::string& dtype, int device,
         std::uintptr_t stream) {
        const char* what = "se_gate_bwd";
        const nfk::SeShape shape = se_shape(what, n, c, hw, channels_last);
        const nfk::DType type = parse_dtype(what, dtype);
        const nfk::SeGate gate = se_gate(what, logits, mask, skip_gain, skip_gain_dtype, dtype, gain);
        if (splits < 1 || rd < 0) {
          throw std::invalid_argument(std::string("nfkernels._C.") + what + ": invalid splits " +
                                      std::to_string(splits) + " or rd " + std::to_string(rd));
        }
        const nfk::SeGradSums in{ptr<void>(sums), ptr<void>(dz), splits};
        const DeviceGuard guard(what, device);
        check(nfk::se_gate_bwd(type, ptr<const void>(dout), gate, in, ptr<const void>(dpool), ptr<const void>(da), rd,
                               ptr<void>(dh), ptr<void>(dshortcut_bias), ptr<void>(dbias), ptr<void>(dskip_partial),
                               ptr<void>(dfc2_bias), ptr<void>(dfc1_bias), shape, ptr<CUstream_st>(stream)),
              what);
      },
      py::call_guard<py::gil_scoped_release>(),
      py::arg("dout"), py::arg("logits"), py::arg("mask"), py::arg("skip_gain"), py::arg("skip_gain_dtype"),
      py::arg("gain"), py::arg("sums"), py::arg("dz"), py::arg("splits"), py::arg("dpool"), py::arg("da"),
      py::arg("rd"), py::arg("dh"), py::arg("dshortcut_bias"), py::arg("dbias"), py::arg("dskip_partial"),
      py::arg("dfc2_bias"), py::arg("dfc1_bias"), py::arg("n"), py::arg("c"), py::arg("hw"), py::arg("channels_last"),
      py::arg("dtype"), py::arg("device"), py::arg("stream"),
      "dh = dout*coef[n, c] + dpool[n, c]/hw in dout's layout and dtype, and per channel, summed over n in\n"
      "the accumulation dtype, with S1, S2 added over the splits of sums (as se_gate_bwd_reduce writes them)\n"
      "and u = coef/k: dshortcut_bias = S1, dbias = coef*S1 + dpool, dskip_partial = S2*u and, with SE,\n"
      "dfc2_bias = dz and dfc1_bias = da per hidden unit (da (n, rd)); without SE dz, dpool, da, dfc2_bias and\n"
      "dfc1_bias are 0.");
}
