// Python binding of the fused ops' C++ host path (CUDA torch only): autotp_kernels.fused builds a ReduceIssuer
// per (shape, epoch parity, push mode) from its plan, a GatherIssuer per (group, epoch parity), and calls `run`
// per op.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include "fused_issue.h"

namespace {

using Copies = std::vector<std::tuple<uint64_t, uint64_t, uint64_t>>;

std::vector<autotp::ByteCopy> copies(const Copies& list) {
  std::vector<autotp::ByteCopy> out;
  for (const auto& [dst, src, bytes] : list) out.push_back({dst, src, bytes});
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autotp fused GEMM + collective: the per-op host path in C++";
  py::class_<autotp::ReduceIssuer>(m, "ReduceIssuer", py::module_local())
      .def(py::init([](const std::vector<std::tuple<int64_t, std::vector<std::tuple<int64_t, int64_t, int64_t>>,
                                                    std::vector<at::Tensor>, Copies, uint64_t>>& steps,
                       const std::vector<std::tuple<std::vector<uint64_t>, int64_t, int64_t, int64_t,
                                                    std::vector<uint64_t>, std::vector<uint64_t>, Copies>>& pieces,
                       at::Tensor slots, bool scatter, int64_t me, int64_t pusher, int64_t reducer, int64_t collector,
                       int programs) {
             std::vector<autotp::IssueStep> s;
             for (const auto& [piece, rows, outs, step_copies, ready] : steps) {
               autotp::IssueStep step{piece, {}, outs, copies(step_copies), ready};
               for (const auto& [seg, lo, hi] : rows) step.rows.push_back({seg, lo, hi});
               if (step.rows.size() != step.outs.size())
                 throw std::invalid_argument("autotp fused: a step needs one output per row range");
               s.push_back(std::move(step));
             }
             std::vector<autotp::IssuePiece> p;
             for (const auto& [ready_waits, lo, hi, out_row0, rdone, rdone_waits, collect] : pieces)
               p.push_back({ready_waits, lo, hi, out_row0, rdone, rdone_waits, copies(collect)});
             return new autotp::ReduceIssuer(std::move(s), std::move(p), slots, scatter, me, pusher, reducer,
                                             collector, programs);
           }),
           py::arg("steps"), py::arg("pieces"), py::arg("slots"), py::arg("scatter"), py::arg("me"), py::arg("pusher"),
           py::arg("reducer"), py::arg("collector"), py::arg("programs"))
      .def("run", &autotp::ReduceIssuer::run, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("epoch"),
           py::arg("compute"));
  py::class_<autotp::GatherIssuer>(m, "GatherIssuer", py::module_local())
      .def(py::init<int64_t, std::vector<uint64_t>, std::vector<uint64_t>, std::vector<uint64_t>, int64_t, int64_t>(),
           py::arg("me"), py::arg("data"), py::arg("signal"), py::arg("waits"), py::arg("copier"), py::arg("device"))
      .def("run", &autotp::GatherIssuer::run, py::arg("x_shard"), py::arg("x_full"), py::arg("weights"),
           py::arg("ys"), py::arg("epoch"), py::arg("compute"));
  m.def(
      "reduce_slots",
      [](const at::Tensor& slots, int64_t lo, int64_t hi, const at::Tensor& out, int64_t out_row0, int64_t keep,
         int programs, int64_t stream) {
        autotp::reduce_slots(slots, lo, hi, out, out_row0, keep, programs, reinterpret_cast<cudaStream_t>(stream));
      },
      py::arg("slots"), py::arg("lo"), py::arg("hi"), py::arg("out"), py::arg("out_row0"), py::arg("keep"),
      py::arg("programs"), py::arg("stream"));
}
