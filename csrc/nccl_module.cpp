// Python binding of the NCCL communicator (CUDA torch + NCCL only).
#include <torch/extension.h>

#include "nccl_comm.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autotp ZeRO NCCL communicator with its own high-priority stream";
  m.def("unique_id", [] { return py::bytes(autotp::NcclComm::unique_id()); });
  m.def("nccl_version", [] {
    int version = 0;
    ncclGetVersion(&version);
    return version;
  });
  py::class_<autotp::NcclComm>(m, "NcclComm", py::module_local())
      .def(py::init([](py::bytes id, int rank, int size, int device, int max_ctas) {
             return new autotp::NcclComm(std::string(id), rank, size, device, max_ctas);
           }),
           py::arg("unique_id"), py::arg("rank"), py::arg("size"), py::arg("device"), py::arg("max_ctas") = 0)
      .def("reduce_scatter", &autotp::NcclComm::reduce_scatter, py::arg("outputs"), py::arg("inputs"),
           py::arg("accumulate"), py::arg("average") = false)
      .def("all_gather", &autotp::NcclComm::all_gather, py::arg("output"), py::arg("input"))
      .def("join", &autotp::NcclComm::join)
      .def_property_readonly("rank", &autotp::NcclComm::rank)
      .def_property_readonly("size", &autotp::NcclComm::size)
      .def_property_readonly("launches", &autotp::NcclComm::launches)
      .def_property_readonly("stream_handle", &autotp::NcclComm::stream_handle);
}
