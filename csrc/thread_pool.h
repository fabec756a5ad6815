// Minimal fork-safe thread pool for the kernels' M-tile loops.
//
// Why not OpenMP: the process shares libgomp with torch, whose idle threads spin-wait
// (OMP_WAIT_POLICY is fixed when torch loads it); on a busy or oversubscribed machine a
// 2-thread OpenMP region then ran 3-5x slower than 1 thread. These workers poll for the
// next loop for a short, bounded time (QGNN_CPU_SPIN_US, default 200 us: a sleeping
// thread took up to ~1 ms to wake on the development VM, longer than a small layer),
// then sleep on a condition variable; each thread runs its own contiguous share of the
// tasks first, then helps with what is left of the others' (so loops over the same rows
// keep each thread on its own rows), and the calling thread works too. Concurrent callers
// do not queue: a caller that finds the pool busy runs its loop on its own thread. Before each
// loop the caller moves a worker found polling on its CPU or on another worker's, or just
// woken and not yet run, off those CPUs (a shared CPU runs one thread at a time while
// another idles).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace qgnn {

// Runs fn(task, tid) for task in [0, ntasks) on up to nthreads threads (tid < nthreads).
// Returns the number of threads used (1 when the pool was busy or nthreads <= 1).
int parallel_for(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn);

// The pool's workers as the caller's placement check sees them: kernel thread ids, the CPU
// each polls on (-1: asleep, or woken and not yet run), and how many times a caller moved
// one off the CPUs taken (thread_pool.cpp, separate()).
struct PoolStats {
  int64_t moves = 0;
  std::vector<int64_t> worker_tids;
  std::vector<int> worker_cpus;
};
PoolStats pool_stats();

// Wakes up to nthreads - 1 sleeping workers now and keeps them polling for hold_us: a
// caller about to run a loop after idle time (an episode request: its input checks take
// ~0.3 ms on an idle VM, a sleeping worker as long to wake) overlaps the wake-up with that
// work, so its first loops are not run by the calling thread alone. No-op with
// QGNN_CPU_SPIN_US=0.
void wake_workers(int nthreads, int64_t hold_us);

// While one of these lives, idle workers poll without a time limit: a caller about to
// issue many loops in a row (the compiled plan runs ~100-200 per episode, with stretches
// of single-threaded steps between them) keeps its workers awake instead of paying a
// wake-up after every stretch longer than the spin budget (measured: the tiny model's
// episode 1.5x slower in the calls after idle time, onnxruntime's workers spin ~45 ms).
class WorkersAwake {
 public:
  explicit WorkersAwake(bool active);  // inactive: a no-op (a single-threaded caller)
  ~WorkersAwake();
  WorkersAwake(const WorkersAwake&) = delete;
  WorkersAwake& operator=(const WorkersAwake&) = delete;

 private:
  bool active_;
};

}  // namespace qgnn
