#include "thread_pool.h"

#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <algorithm>
#include <thread>
#include <vector>

namespace qgnn {
namespace {

struct Pool {
  std::mutex busy;                 // one parallel_for at a time
  std::mutex mu;
  std::condition_variable wake, done;
  std::vector<std::thread> workers;
  const std::function<void(int64_t, int)>* fn = nullptr;
  std::atomic<int64_t> next{0};
  int64_t ntasks = 0;
  int64_t gen = 0;
  bool open = false;               // workers may still join the current generation
  int wanted = 0;                  // workers allowed to take part in this generation
  int active = 0;                  // workers inside work() right now

  void work(int tid) {
    for (int64_t i; (i = next.fetch_add(1)) < ntasks;) (*fn)(i, tid);
  }

  void worker(int idx) {
    int64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu);
    for (;;) {
      wake.wait(lk, [&] { return gen != seen; });
      seen = gen;
      // a worker that wakes after the caller has finished everything stays out: the
      // caller never waits for a thread the OS has not scheduled yet
      if (idx >= wanted || !open) continue;
      ++active;
      lk.unlock();
      work(idx + 1);
      lk.lock();
      if (--active == 0) done.notify_one();
    }
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
      while (static_cast<int>(workers.size()) < nw) {
        const int idx = static_cast<int>(workers.size());
        workers.emplace_back([this, idx] { worker(idx); });
        workers.back().detach();   // the pool lives for the whole process (never destroyed)
      }
      fn = &f;
      ntasks = n;
      next.store(0);
      wanted = nw;
      open = true;
      ++gen;
    }
    wake.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(mu);
    open = false;                  // tasks are all claimed; late workers stay out
    done.wait(lk, [&] { return active == 0; });
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

}  // namespace qgnn
