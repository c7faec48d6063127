// Python binding of the bucket planner and launch tracker (pybind11 only: no torch headers, quick to build).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "bucket_plan.h"

namespace py = pybind11;
using autotp::Bucket;
using autotp::LaunchTracker;
using autotp::Segment;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "autotp ZeRO bucket planner and launch tracker (C++)";
  py::register_exception<std::invalid_argument>(m, "PlanError", PyExc_ValueError);

  py::class_<Bucket>(m, "Bucket", py::module_local())
      .def_readonly("index", &Bucket::index)
      .def_readonly("key", &Bucket::key)
      .def_readonly("params", &Bucket::params)
      .def_readonly("offsets", &Bucket::offsets)
      .def_readonly("numel", &Bucket::numel)
      .def_readonly("padded", &Bucket::padded)
      .def_readonly("dp", &Bucket::dp)
      .def_property_readonly("partition_numel", &Bucket::partition_numel);

  py::class_<Segment>(m, "Segment", py::module_local())
      .def_readonly("param", &Segment::param)
      .def_readonly("param_start", &Segment::param_start)
      .def_readonly("partition_start", &Segment::partition_start)
      .def_readonly("length", &Segment::length);

  m.def("plan_buckets", &autotp::plan_buckets, py::arg("numels"), py::arg("keys"), py::arg("bucket_size"),
        py::arg("dp"), py::arg("align"));
  m.def("bucket_segments", &autotp::bucket_segments, py::arg("bucket"), py::arg("dp_rank"), py::arg("numels"));

  py::class_<LaunchTracker>(m, "LaunchTracker", py::module_local())
      .def(py::init<const std::vector<Bucket>&, int64_t>(), py::arg("buckets"), py::arg("num_params"))
      .def(py::init([](const std::vector<std::vector<int64_t>>& params_per_bucket, int64_t num_params) {
             std::vector<Bucket> buckets(params_per_bucket.size());
             for (size_t i = 0; i < buckets.size(); ++i) {
               buckets[i].index = static_cast<int64_t>(i);
               buckets[i].params = params_per_bucket[i];
             }
             return new LaunchTracker(buckets, num_params);
           }),
           py::arg("params_per_bucket"), py::arg("num_params"))
      .def("reset", &LaunchTracker::reset)
      .def("arrive", &LaunchTracker::arrive, py::arg("param"))
      .def("flush", &LaunchTracker::flush)
      .def("launched", &LaunchTracker::launched, py::arg("bucket"))
      .def("has_arrived", &LaunchTracker::has_arrived, py::arg("param"))
      .def("bucket_of", &LaunchTracker::bucket_of, py::arg("param"))
      .def_property_readonly("next_launch", &LaunchTracker::next_launch);
}
