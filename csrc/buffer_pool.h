// Recycled host buffers for the training op's per-step tensors (H, T, dV: [B, N*D] fp32 each).
//
// Each training step allocates the same few large tensors and frees them after the backward. glibc
// serves such sizes with fresh mmaps (or trims them back to the OS), so every step first-touches
// them again: a page fault and a page clear per 4 KB, about 30 MB per step at the Criteo shape. That
// was measured at 15-25% of a bf16 matrix-decoder step. The pool keeps freed buffers by exact byte
// size and hands them out again; a tensor made here returns its buffer when its storage dies.
//
// Bounded (kMaxPooledBytes = 256 MB idle in all; release() frees the idle buffers), thread-safe, and
// never destroyed (a tensor may outlive static destruction at exit). SFG_FAST_NO_BUFFER_POOL=1 turns it
// off (plain torch::empty), read per call.
#pragma once

#include <torch/extension.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sfg {
namespace detail {

class BufferPool {
 public:
  static constexpr int64_t kMaxPooledBytes = int64_t(256) << 20;

  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();  // leaked on purpose: see the file comment
    return *pool;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        pooled_bytes_ -= static_cast<int64_t>(bytes);
        return p;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes == 0 ? 64 : bytes) != 0) throw std::bad_alloc();
    return p;
  }

  // Frees every idle buffer; returns the bytes freed (buffers in use return to the pool later).
  int64_t release() {
    std::unordered_map<size_t, std::vector<void*>> idle;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(free_);
      bytes = pooled_bytes_;
      pooled_bytes_ = 0;
    }
    for (auto& entry : idle)
      for (void* p : entry.second) std::free(p);
    return bytes;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pooled_bytes_;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (pooled_bytes_ + static_cast<int64_t>(bytes) <= kMaxPooledBytes) {
        free_[bytes].push_back(p);
        pooled_bytes_ += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  int64_t pooled_bytes_ = 0;
};

inline bool buffer_pool_enabled() {
  const char* off = std::getenv("SFG_FAST_NO_BUFFER_POOL");
  return off == nullptr || std::strcmp(off, "0") == 0;
}

// An uninitialised fp32 CPU tensor of `sizes` whose buffer comes from (and returns to) the pool.
inline torch::Tensor pooled_empty(c10::IntArrayRef sizes) {
  const auto opts = torch::TensorOptions().dtype(torch::kFloat);
  if (!buffer_pool_enabled()) return torch::empty(sizes, opts);
  int64_t count = 1;
  for (const auto s : sizes) count *= s;
  const size_t bytes = static_cast<size_t>(count) * sizeof(float);
  void* p = BufferPool::get().take(bytes);
  return torch::from_blob(
      p, sizes, [bytes](void* q) { BufferPool::get().give_back(q, bytes); }, opts);
}

}  // namespace detail
}  // namespace sfg
