// pybind11 part of decodekit._C: non-tensor helpers only (ops are registered via TORCH_LIBRARY).
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>
#include "cpu/kernels.h"

#ifndef DK_TORCH_VERSION
#define DK_TORCH_VERSION "unknown"
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "decodekit native extension";
  m.def("cpu_features", []() {
    py::dict d;
    d["avx2"] = dk::cpu::cpu_has_avx2();
    d["avx512"] = dk::cpu::cpu_has_avx512();
    d["avx512_bf16"] = dk::cpu::cpu_has_avx512bf16();
    d["active_isa"] = std::string(dk::cpu::active_isa());
    return d;
  });
  m.def(
      "set_isa",
      [](const std::string& name) {
        try {
          dk::cpu::set_isa(name.c_str());
        } catch (const std::runtime_error& e) { throw py::value_error(e.what()); }
        return std::string(dk::cpu::active_isa());
      },
      "Force the CPU kernel path: 'scalar', 'avx2', 'avx512' or 'auto'.");
  m.def("build_info", []() {
    py::dict d;
    d["torch"] = DK_TORCH_VERSION;
#ifdef DK_WITH_CUDA
    d["cuda"] = true;
#else
    d["cuda"] = false;
#endif
    d["compiler"] = __VERSION__;
#if DK_X86_PATHS
    d["isa_paths"] = py::make_tuple("scalar", "avx2", "avx512");
#else
    d["isa_paths"] = py::make_tuple("scalar");  // not x86-64: the scalar path is the only one compiled
#endif
#ifdef INTRA_OP_PARALLEL
    d["intra_op_parallel"] = true;  // at::parallel_for in the bindings really forks (see CMakeLists.txt)
#else
    d["intra_op_parallel"] = false;
#endif
    return d;
  });
  m.def("_parallel_probe", [](int64_t n) {
    // How many distinct threads an at::parallel_for over n one-item chunks used, as the bindings call it.
    std::vector<int> tid(size_t(std::max<int64_t>(n, 0)), -1);
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) tid[size_t(i)] = at::get_thread_num();
    });
    return std::set<int>(tid.begin(), tid.end()).size();
  });
}
