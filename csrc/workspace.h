// Per-thread scratch memory for a kernel call's temporaries (row pointers, row and window
// sums, padded copies, packed panels, per-thread tiles): taken by bumping an offset, given
// back when the Scratch that took them goes out of scope, and kept for the thread's next
// call. A compiled plan runs ~90 steps per episode; each had allocated, zero-filled and freed
// its temporaries (malloc, free and memset ~3% of the tiny model's T=1 episode, Zen 4).
// Memory is uninitialised; each thread keeps its high-water mark until it exits.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qgnn {

class Scratch {
 public:
  Scratch();   // marks the calling thread's workspace
  ~Scratch();  // gives back everything taken through this object (and any Scratch nested in it)
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  // n values of T, 64-byte aligned, uninitialised, readable 64 bytes beyond; valid until this
  // Scratch ends
  template <class T>
  T* take(size_t n) {
    return static_cast<T*>(bytes(n * sizeof(T)));
  }

  // `count` slices of n values (per-image flags and maxima), each on its own cache lines
  // (the threads writing neighbouring values would share lines): slices(i). A thread's own
  // buffers are separate takes in a row instead (see run_winograd, csrc/qgemm.cpp)
  template <class T>
  struct Slices {
    T* base;
    size_t stride;
    T* operator()(int64_t i) const { return base + stride * static_cast<size_t>(i); }
  };
  template <class T>
  Slices<T> take_slices(int64_t count, size_t n) {
    static_assert(64 % sizeof(T) == 0, "slices of whole cache lines");
    const size_t stride = (n * sizeof(T) + 63) / 64 * 64 / sizeof(T);
    return Slices<T>{take<T>(stride * static_cast<size_t>(count)), stride};
  }

 private:
  void* bytes(size_t n);
  size_t block_, offset_;  // the mark
};

}  // namespace qgnn
