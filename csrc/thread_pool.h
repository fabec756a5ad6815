// Minimal fork-safe thread pool for the kernels' M-tile loops.
//
// Why not OpenMP: the process shares libgomp with torch, whose idle threads spin-wait
// (OMP_WAIT_POLICY is fixed when torch loads it); on a busy or oversubscribed machine a
// 2-thread OpenMP region then ran 3-5x slower than 1 thread. These workers poll for the
// next loop for a short, bounded time (QGNN_CPU_SPIN_US, default 200 us: a sleeping
// thread took up to ~1 ms to wake on the development VM, longer than a small layer),
// then sleep on a condition variable; tasks are handed out by an atomic counter
// (dynamic schedule), and the calling thread works too. Concurrent callers do not
// queue: a caller that finds the pool busy runs its loop on its own thread.
#pragma once

#include <cstdint>
#include <functional>

namespace qgnn {

// Runs fn(task, tid) for task in [0, ntasks) on up to nthreads threads (tid < nthreads).
// Returns the number of threads used (1 when the pool was busy or nthreads <= 1).
int parallel_for(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn);

}  // namespace qgnn
