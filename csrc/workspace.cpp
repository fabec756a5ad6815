#include "workspace.h"

#include <algorithm>
#include <cstdlib>
#include <new>
#include <vector>

namespace qgnn {
namespace {

// A thread's blocks: [0, cur) and cur's first `off` bytes are taken, the rest is free.
// A request that does not fit the current block moves on to the next one, replacing a free
// block that is too small; blocks grow by doubling from 1 MiB, so a thread settles on a few.
struct Workspace {
  struct Block {
    uint8_t* p;
    size_t size;
  };
  std::vector<Block> blocks;
  size_t cur = 0, off = 0;

  ~Workspace() {
    for (Block& b : blocks) std::free(b.p);
  }

  static Block make(size_t size) {
    void* p = std::aligned_alloc(64, size);
    if (!p) throw std::bad_alloc();
    return Block{static_cast<uint8_t*>(p), size};
  }

  void* take(size_t n) {
    n = (n + 63) / 64 * 64 + 64;  // + a line of slack, as the buffers it replaced had (vector overreads)
    for (;;) {
      if (cur == blocks.size()) {
        blocks.push_back(make(std::max<size_t>(n, blocks.empty() ? size_t(1) << 20 : 2 * blocks.back().size)));
        off = 0;
      }
      Block& b = blocks[cur];
      if (off + n <= b.size) {
        void* r = b.p + off;
        off += n;
        return r;
      }
      if (off == 0) {  // a free block, too small: replace it
        const size_t size = std::max(n, 2 * b.size);
        Block nb = make(size);
        std::free(b.p);
        b = nb;
        continue;
      }
      ++cur;
      off = 0;
    }
  }
};

Workspace& workspace() {
  thread_local Workspace w;
  return w;
}

}  // namespace

Scratch::Scratch() {
  Workspace& w = workspace();
  block_ = w.cur;
  offset_ = w.off;
}

Scratch::~Scratch() {
  Workspace& w = workspace();
  w.cur = block_;
  w.off = offset_;
}

void* Scratch::bytes(size_t n) { return workspace().take(n); }

}  // namespace qgnn
