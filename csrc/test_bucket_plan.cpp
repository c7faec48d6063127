// C++ unit test of the planner and launch tracker (no CUDA, no Python): built and run by CMake's ctest.
#include <cstdio>
#include <cstdlib>
#include <set>
#include <stdexcept>
#include <vector>

#include "bucket_plan.h"

#define EXPECT(cond)                                                      \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                       \
    }                                                                     \
  } while (0)

using namespace autotp;

int main() {
  // Greedy fill in backward order, padding to dp * align.
  auto buckets = plan_buckets({10, 300, 7, 500, 40}, {0, 0, 0, 0, 0}, 600, 2, 4);
  EXPECT(buckets.size() == 2);
  EXPECT((buckets[0].params == std::vector<int64_t>{4, 3, 2}));
  EXPECT((buckets[0].offsets == std::vector<int64_t>{0, 40, 540}));
  EXPECT(buckets[0].numel == 547 && buckets[0].padded == 552);
  EXPECT((buckets[1].params == std::vector<int64_t>{1, 0}) && buckets[1].padded == 312);

  // Interleaved keys: the small key-1 bucket completes last and is numbered last.
  buckets = plan_buckets({4, 100, 4, 100, 4, 100}, {1, 0, 1, 0, 1, 0}, 150, 1, 1);
  EXPECT(buckets.size() == 4 && buckets[3].key == 1);
  EXPECT((buckets[3].params == std::vector<int64_t>{4, 2, 0}));

  // Segments cover every element of every parameter exactly once over the DP ranks.
  std::vector<int64_t> numels = {13, 29, 3, 50};
  for (const Bucket& bucket : plan_buckets(numels, {0, 0, 0, 0}, 60, 3, 2)) {
    std::set<std::pair<int64_t, int64_t>> covered;
    for (int64_t rank = 0; rank < 3; ++rank) {
      for (const Segment& seg : bucket_segments(bucket, rank, numels)) {
        EXPECT(seg.partition_start + seg.length <= bucket.partition_numel());
        for (int64_t i = 0; i < seg.length; ++i) EXPECT(covered.insert({seg.param, seg.param_start + i}).second);
      }
    }
    int64_t expected = 0;
    for (int64_t p : bucket.params) expected += numels[p];
    EXPECT(static_cast<int64_t>(covered.size()) == expected);
  }

  // Launch order: bucket 1 completing first waits for bucket 0; both launch when 0 completes.
  buckets = plan_buckets({5, 5, 5, 5}, {0, 0, 0, 0}, 10, 1, 1);  // buckets {3,2} then {1,0}
  LaunchTracker tracker(buckets, 4);
  EXPECT(tracker.arrive(0).empty() && tracker.arrive(1).empty());
  EXPECT(tracker.arrive(3).empty());
  EXPECT((tracker.arrive(2) == std::vector<int64_t>{0, 1}));
  EXPECT(tracker.flush().empty());
  tracker.reset();
  EXPECT(tracker.arrive(3).empty() && !tracker.launched(0));
  EXPECT((tracker.flush() == std::vector<int64_t>{0, 1}) && tracker.launched(1));

  bool threw = false;
  try {
    plan_buckets({1}, {0}, 0, 1, 1);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  EXPECT(threw);
  std::puts("test_bucket_plan: OK");
  return 0;
}
