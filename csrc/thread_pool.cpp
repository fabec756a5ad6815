#include "thread_pool.h"

#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QGNN_PAUSE() _mm_pause()
#else
#define QGNN_PAUSE() std::this_thread::yield()
#endif

namespace qgnn {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle worker polls for the next parallel_for before it sleeps, and how long
// the caller polls for the last worker before it sleeps. Waking a sleeping thread took
// ~1 ms on the development VM (the idle vCPU is halted), longer than a small layer runs;
// consecutive kernels of a forward pass come well within this window. QGNN_CPU_SPIN_US
// overrides it (0: never poll).
int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* s = std::getenv("QGNN_CPU_SPIN_US");
    long us = 200;
    if (s && *s) {
      char* end = nullptr;
      const long v = std::strtol(s, &end, 10);
      if (end && *end == '\0' && v >= 0 && v <= 1000000) us = v;
    }
    return static_cast<int64_t>(us) * 1000;
  }();
  return ns;
}

std::atomic<int> g_awake{0};  // live WorkersAwake objects
std::atomic<int64_t> g_hold_until{0};  // steady-clock ns until which idle workers poll (wake_workers)

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
}

// Polls pred() with pause instructions until it holds or spin_ns() has passed (no limit
// while a WorkersAwake lives and `hold`); the caller then waits on its condition variable
// with the same predicate either way.
template <class Pred>
void poll(Pred pred, bool hold) {
  const int64_t budget = spin_ns();
  if (budget <= 0) return;
  auto until = Clock::now() + std::chrono::nanoseconds(budget);
  // held (by a plan run or wake_workers): also yield every 4th poll -- the thread that will
  // post the next loop may share this CPU, and pausing alone held it off for a whole time
  // slice (measured, tiny T=1: p90 6.3 -> 2.4 ms, p50 unchanged; yielding on every poll
  // cost 10% of the p50)
  bool held = false;
  for (int i = 0; !pred(); ++i) {
    for (int j = 0; j < 16; ++j) QGNN_PAUSE();
    if (held && (i & 3) == 3) std::this_thread::yield();
    if ((i & 63) == 63 || held) {
      const auto now = Clock::now();
      held = hold && (g_awake.load(std::memory_order_relaxed) > 0 ||
                      now_ns() < g_hold_until.load(std::memory_order_relaxed));
      if (held)
        until = now + std::chrono::nanoseconds(budget);  // the budget runs from the holder's end
      else if (now >= until)
        return;
    }
  }
}

// Where a worker runs, published by the worker while it polls; -1 while it sleeps, and after a
// wake-up until it first runs.
struct Placement {
  std::atomic<int> cpu{-1};
  std::atomic<int64_t> tid{0};  // the kernel's thread id (for sched_setaffinity)
  int64_t moved_ns = 0;         // its last move (by a caller, under mu)
};

// A worker on the caller's CPU (or on another worker's) runs only when that thread is
// preempted, while a CPU idles. On the 2-vCPU development VM the kernel's wake-up placement
// queued one there after idle time, and its load balancer took ~10 ms to move it: after
// another engine's run in the process (onnxruntime), 8 tiny episodes in a row ran at one
// thread's speed, with the worker joining 3 of their 176 loops. The caller moves a worker
// polling on a taken CPU, or one of unknown place (just woken, not yet run: maybe queued
// behind the caller; asleep, where the move changes nothing), off the taken CPUs: its
// affinity without them, then its own mask back (the kernel migrates it at once and it
// stays). At most once a millisecond per worker (three system calls). Returns whether it
// moved it.
bool separate(Placement& w, cpu_set_t& taken, int64_t now) {
  const int cpu = w.cpu.load(std::memory_order_relaxed);
  if (cpu >= CPU_SETSIZE) return false;
  if (cpu >= 0 && !CPU_ISSET(cpu, &taken)) {
    CPU_SET(cpu, &taken);
    return false;
  }
  const pid_t tid = static_cast<pid_t>(w.tid.load(std::memory_order_relaxed));
  if (tid <= 0 || now - w.moved_ns < 1000000) return false;
  w.moved_ns = now;
  cpu_set_t allowed, away;
  if (sched_getaffinity(tid, sizeof(allowed), &allowed) != 0) return false;
  CPU_ZERO(&away);
  for (int c = 0; c < CPU_SETSIZE; ++c)
    if (CPU_ISSET(c, &allowed) && !CPU_ISSET(c, &taken)) CPU_SET(c, &away);
  if (CPU_COUNT(&away) == 0) return false;
  if (sched_setaffinity(tid, sizeof(away), &away) != 0) return false;
  sched_setaffinity(tid, sizeof(allowed), &allowed);
  w.cpu.store(-1, std::memory_order_relaxed);  // republished where it now runs
  return true;
}

struct Pool {
  std::mutex busy;                 // one parallel_for at a time
  std::mutex mu;
  std::condition_variable wake, done;
  std::vector<std::thread> workers;
  std::vector<std::unique_ptr<Placement>> placement;  // per worker
  std::atomic<int64_t> moves{0};   // workers moved off a taken CPU (pool_stats)
  const std::function<void(int64_t, int)>* fn = nullptr;
  std::atomic<int64_t> gen{0};     // written under mu; read lock-free by polling workers
  bool open = false;               // workers may still join the current generation
  int wanted = 0;                  // workers allowed to take part in this generation
  std::atomic<int> active{0};      // workers inside work() right now

  // Thread t first runs the t-th of p contiguous, in-order shares of the tasks (sizes within
  // one), then takes what is left of the others' shares: consecutive loops over the same rows
  // give each thread the rows it wrote in the loop before (still in its own cache). One
  // shared counter had each 2-thread loop read about half its input from the other core:
  // the tiny model's episode 5-6% slower at T=1 and T=10, egnn-tiny's 10% (interleaved in
  // one process, Zen 4).
  struct alignas(64) Range {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  std::unique_ptr<Range[]> ranges;
  int cap = 0, parts = 1;
  void work(int tid) {
    for (int k = 0; k < parts; ++k) {
      Range& r = ranges[(tid + k) % parts];
      for (int64_t i; (i = r.next.fetch_add(1)) < r.end;) (*fn)(i, tid);
    }
  }

  void worker(int idx, Placement& where) {
    where.tid.store(static_cast<int64_t>(syscall(SYS_gettid)));
    int64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      lk.unlock();
      poll([&] {
        where.cpu.store(sched_getcpu(), std::memory_order_relaxed);
        return gen.load(std::memory_order_acquire) != seen;
      }, true);
      lk.lock();
      if (gen.load() == seen) where.cpu.store(-1, std::memory_order_relaxed);  // about to sleep
      wake.wait(lk, [&] { return gen.load() != seen; });
      where.cpu.store(sched_getcpu(), std::memory_order_relaxed);
      seen = gen.load();
      // a worker that wakes after the caller has finished everything stays out: the
      // caller never waits for a thread the OS has not scheduled yet
      if (idx >= wanted || !open) continue;
      active.fetch_add(1);
      lk.unlock();
      work(idx + 1);
      lk.lock();
      if (active.fetch_sub(1) == 1) done.notify_one();
    }
  }

  void spawn(int nw) {  // under mu
    while (static_cast<int>(workers.size()) < nw) {
      const int idx = static_cast<int>(workers.size());
      placement.emplace_back(new Placement());
      Placement* where = placement.back().get();  // stays put when the vector grows
      workers.emplace_back([this, idx, where] { worker(idx, *where); });
      workers.back().detach();   // the pool lives for the whole process (never destroyed)
    }
  }

  // A generation without work: sleeping workers wake and poll until hold_until.
  void wake_all(int nw, int64_t hold_until) {
    {
      std::lock_guard<std::mutex> lk(mu);
      spawn(nw);
      int64_t cur = g_hold_until.load();
      while (cur < hold_until && !g_hold_until.compare_exchange_weak(cur, hold_until)) {
      }
      gen.fetch_add(1, std::memory_order_release);  // `open` untouched: nobody joins a run by it
    }
    wake.notify_all();
  }

  int run(int nthreads, int64_t n, const std::function<void(int64_t, int)>& f) {
    std::unique_lock<std::mutex> guard(busy, std::try_to_lock);
    if (!guard.owns_lock() || nthreads <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) f(i, 0);
      return 1;
    }
    const int nw = static_cast<int>(std::min<int64_t>(nthreads, n)) - 1;
    {
      std::lock_guard<std::mutex> lk(mu);
      spawn(nw);
      const int me = sched_getcpu();
      if (me >= 0 && me < CPU_SETSIZE) {
        cpu_set_t taken;
        CPU_ZERO(&taken);
        CPU_SET(me, &taken);
        const int64_t now = now_ns();
        for (int w = 0; w < nw; ++w) moves += separate(*placement[w], taken, now);
      }
      fn = &f;
      parts = nw + 1;
      if (parts > cap) {  // no thread is in work(): the last loop's workers have all left
        ranges.reset(new Range[parts]);
        cap = parts;
      }
      const int64_t each = n / parts, more = n % parts;  // the first `more` ranges one longer
      for (int t = 0; t < parts; ++t) {
        ranges[t].next.store(t * each + std::min<int64_t>(t, more));
        ranges[t].end = (t + 1) * each + std::min<int64_t>(t + 1, more);
      }
      wanted = nw;
      open = true;
      gen.fetch_add(1, std::memory_order_release);
    }
    wake.notify_all();
    work(0);
    {
      std::lock_guard<std::mutex> lk(mu);
      open = false;                // tasks are all claimed; late workers stay out
    }
    // the last worker is finishing its final task: poll briefly before sleeping
    poll([&] { return active.load() == 0; }, false);
    std::unique_lock<std::mutex> lk(mu);
    done.wait(lk, [&] { return active.load() == 0; });
    return nw + 1;
  }
};

Pool* g_pool = nullptr;
std::once_flag g_once;

void after_fork_child() { g_pool = new Pool(); }  // the parent's workers do not exist here

Pool* pool() {
  std::call_once(g_once, [] {
    g_pool = new Pool();
    pthread_atfork(nullptr, nullptr, after_fork_child);
  });
  return g_pool;
}

}  // namespace

int parallel_for(int nthreads, int64_t ntasks, const std::function<void(int64_t, int)>& fn) {
  return pool()->run(nthreads, ntasks, fn);
}

PoolStats pool_stats() {
  Pool* p = pool();
  std::lock_guard<std::mutex> lk(p->mu);
  PoolStats s;
  s.moves = p->moves.load();
  for (const auto& w : p->placement) {
    s.worker_tids.push_back(w->tid.load());
    s.worker_cpus.push_back(w->cpu.load());
  }
  return s;
}

void wake_workers(int nthreads, int64_t hold_us) {
  if (nthreads <= 1 || hold_us <= 0 || spin_ns() <= 0) return;
  pool()->wake_all(nthreads - 1, now_ns() + hold_us * 1000);
}

WorkersAwake::WorkersAwake(bool active) : active_(active) {
  if (active_) g_awake.fetch_add(1);
}
WorkersAwake::~WorkersAwake() {
  if (active_) g_awake.fetch_sub(1);
}

}  // namespace qgnn
