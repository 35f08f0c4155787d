// The kernel emulator's scheduler: a launch runs its blocks one at a time, in a shuffled order,
// and the threads of a block as fibers (fiber.h), warp by warp. Faults are recorded in a message
// and returned to Python (tests/cuda/emulator.py), never abort()ed.
//
// Schedule (deterministic for a seed, adversarial on purpose): blocks in a seeded permutation of
// the grid; within a block, warps (32 consecutive linear thread ids) in a shuffled order, each
// warp run as far as it can go (until every lane waits at a barrier or a warp collective, or has
// returned) before the next warp starts, and a fresh warp order after each __syncthreads. So a
// fast warp runs ahead into the next phase whenever the kernel lets it: a missing barrier shows.
//
// TSan mode (EMU_TSAN=1): synchronisation is modelled explicitly; fibers switch with
// __tsan_switch_to_fiber_no_sync, so only these edges exist:
//   host -> every thread at launch start, every thread -> host at launch end;
//   __syncthreads: release then acquire on the block's barrier object;
//   __syncwarp: the same on the warp's object; shuffles, votes: nothing (they order no memory).
// Blocks are concurrent, as on a GPU, as far as TSan's cost allows: a TSan context (v2, gcc 12)
// costs 0.8 MB and 0.3 ms to create, so the process keeps up to 2 x 1024, in two sets that the
// blocks use in turn, in run order: two blocks run one after the other share no context, and a race
// between them is reported; blocks an even distance apart reuse contexts, which orders them. (The
// run order is a fresh permutation per launch: a given pair of blocks is checked in about half the
// launches, a block that conflicts with all others in every launch.) Each block gets fresh
// stacks and sync objects, and fresh shared memory: __shared__ variables are
// thread_local in this mode and every block runs on its own new OS thread, which allocates its
// TLS before its fibers start. That thread is waited for with a raw futex, not pthread_join,
// which TSan would count as an edge to the host and so to the next block. (glibc frees a dead
// thread's TLS later, from another thread: tests/cuda/tsan.supp drops those reports.)
#pragma once
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef EMU_TSAN
#define EMU_TSAN 0
#endif
#if EMU_TSAN
#include <linux/futex.h>
#include <pthread.h>
#include <sanitizer/tsan_interface.h>
#include <sys/syscall.h>
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
// The runtime's own bookkeeping is shared by all fibers on purpose: not instrumented.
#define EMU_RUNTIME __attribute__((no_sanitize_thread, noinline))
#define EMU_ACQUIRE(address) __tsan_acquire(address)
#define EMU_RELEASE(address) __tsan_release(address)
#else
#define EMU_RUNTIME
#define EMU_ACQUIRE(address) ((void)0)
#define EMU_RELEASE(address) ((void)0)
#endif

#include "fiber.h"

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

namespace emu {

constexpr unsigned kMaxThreads = 1024;
constexpr size_t kStackBytes = 256 << 10;  // per thread: mapped, but only the pages touched cost memory
// TSan sync objects of a block, at g.sync.
constexpr int kSyncStart = 0, kSyncBarrier = 1, kSyncWarp = 2, kSyncEnd = 2 + kMaxThreads / 32;

// One kernel of the module: filled in by the generated registry (emulator.h, EMU_KERNEL).
struct KernelEntry {
  const char* name;
  int param_count;
  const int* sizes;
  const int* kinds;
  void (*invoke)(const void* const* args);
};

enum class State : unsigned char { ready, barrier, warp, done };
enum class Op : unsigned char { shfl, ballot, all, any, syncwarp };
inline const char* op_name(Op op) {
  static const char* names[] = {"a shuffle", "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp"};
  return names[(int)op];
}

struct Thread {
  Context context;
  uint3 idx;
  unsigned linear;
  State state;
  unsigned barrier_count;  // threads whose __syncthreads_count predicate held
  Op op;                   // the warp collective this thread waits in, with its arguments
  unsigned mask;
  int src;
  uint64_t value, result;
  void* fiber;  // TSan's context
  bool fenced;  // a __threadfence since this thread's last atomic (emulator.h)
};

// The launch in progress (one at a time: the Python side holds a lock).
struct Launch {
  const KernelEntry* kernel;
  const void* const* args;
  uint64_t seed;
  dim3 grid, block;
  uint3 block_idx;
  uint64_t block_linear, block_serial;  // the block's index in the grid, and in the run order
  unsigned threads;  // per block
  Thread thread[kMaxThreads];
  Thread* current;  // the running fiber; null while the scheduler runs
  Context scheduler;
  void* scheduler_fiber;
  unsigned done, waiting, predicate_count, barrier_first;
  int exited, barrier_line;
  uint64_t epoch;  // bumped by every completed __syncthreads
  Stacks stacks;
  void** fiber_pool;  // TSan contexts, made on first use, reused (see the top of this file)
  char* sync;  // TSan sync objects of the block, at the kSync* offsets
  char launch_start, launch_end;  // TSan sync objects: host -> kernel, kernel -> host
  volatile int block_finished;    // TSan mode: futex word the host waits on
  bool failed;
  char message[1024];
  sigjmp_buf fault_jump;
};
inline Launch g;

EMU_RUNTIME inline const char* where(const Thread& t) {
  static char text[4][64];
  static unsigned next;
  char* s = text[next++ % 4];
  snprintf(s, sizeof text[0], "thread (%u,%u,%u)", t.idx.x, t.idx.y, t.idx.z);
  return s;
}

EMU_RUNTIME inline void vrecord(const char* format, va_list ap) {
  if (g.failed) return;
  g.failed = true;
  int n = snprintf(g.message, sizeof g.message, "%s: block (%u,%u,%u) of grid (%u,%u,%u) x (%u,%u,%u) threads: ",
                   g.kernel->name, g.block_idx.x, g.block_idx.y, g.block_idx.z, g.grid.x, g.grid.y, g.grid.z,
                   g.block.x, g.block.y, g.block.z);
  vsnprintf(g.message + n, sizeof g.message - n, format, ap);
}

EMU_RUNTIME inline void record(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  vrecord(format, ap);
  va_end(ap);
}

// The running fiber hands control back to the scheduler; returns when the scheduler resumes it.
EMU_RUNTIME inline void park() {
  Thread* t = g.current;
#if EMU_TSAN
  __tsan_switch_to_fiber(g.scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  switch_context(&t->context, &g.scheduler);
}

EMU_RUNTIME inline void resume(Thread* t) {
  g.current = t;
#if EMU_TSAN
  __tsan_switch_to_fiber(t->fiber, __tsan_switch_to_fiber_no_sync);
#endif
  switch_context(&g.scheduler, &t->context);
  g.current = nullptr;
}

// A fault found by a running thread: record it and leave the fiber for good (the scheduler
// abandons the block; the fiber's stack is simply reused).
[[noreturn]] EMU_RUNTIME inline void fault(const char* format, ...) {
  va_list ap;
  va_start(ap, format);
  vrecord(format, ap);
  va_end(ap);
  park();
  __builtin_trap();
}

EMU_RUNTIME inline void exit_thread() {
  Thread* t = g.current;
  t->state = State::done;
  ++g.done;
  if (g.exited < 0) g.exited = (int)t->linear;
  if (g.waiting)
    fault("%s returned while %u threads wait at __syncthreads (line %d): every thread of a block must reach it",
          where(*t), g.waiting, g.barrier_line);
  const unsigned lane = t->linear % 32, base = t->linear - lane;
  for (unsigned l = 0; l < 32 && base + l < g.threads; ++l) {
    const Thread& o = g.thread[base + l];
    if (o.state == State::warp && (o.mask >> lane & 1))
      fault("%s (warp %u lane %u) returned while lane %u waits for it in %s with mask 0x%08x", where(*t), base / 32,
            lane, l, op_name(o.op), o.mask);
  }
  park();
  __builtin_trap();  // a returned thread is never resumed
}

EMU_RUNTIME inline void fiber_main() {
  EMU_ACQUIRE(&g.launch_start);
  EMU_ACQUIRE(g.sync + kSyncStart);
  g.kernel->invoke(g.args);
  exit_thread();
}

EMU_RUNTIME inline unsigned syncthreads(int line, bool predicate) {
  Thread* t = g.current;
  if (g.done)
    fault("%s reached __syncthreads (line %d) after %s returned: every thread of a block must reach it",
          where(*t), line, where(g.thread[g.exited]));
  if (g.waiting == 0) {
    g.barrier_line = line;
    g.barrier_first = t->linear;
    g.predicate_count = 0;
  } else if (line != g.barrier_line) {
    fault("divergent __syncthreads: %s waits at line %d, %s reached the one at line %d",
          where(g.thread[g.barrier_first]), g.barrier_line, where(*t), line);
  }
  g.predicate_count += predicate;
  EMU_RELEASE(g.sync + kSyncBarrier);
  t->state = State::barrier;
  if (++g.waiting == g.threads) {  // the last one in: all go on (after a fresh warp order)
    for (unsigned i = 0; i < g.threads; ++i) {
      g.thread[i].state = State::ready;
      g.thread[i].barrier_count = g.predicate_count;
    }
    g.waiting = 0;
    ++g.epoch;
  }
  park();
  EMU_ACQUIRE(g.sync + kSyncBarrier);
  return t->barrier_count;
}

EMU_RUNTIME inline unsigned lane_id() { return g.current->linear % 32; }

EMU_RUNTIME inline void complete_warp_op(unsigned base, unsigned mask, Op op) {
  uint64_t votes = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1) && g.thread[base + l].value) votes |= 1ull << l;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Thread& o = g.thread[base + l];
    switch (op) {
      case Op::shfl:  // reading a lane outside the mask is undefined on a GPU: all ones (a NaN, -1)
        o.result = (o.src >= 0 && o.src < 32 && (mask >> o.src & 1)) ? g.thread[base + o.src].value : ~0ull;
        break;
      case Op::ballot: o.result = votes; break;
      case Op::all: o.result = votes == mask; break;
      case Op::any: o.result = votes != 0; break;
      case Op::syncwarp: o.result = 0; break;
    }
    o.state = State::ready;
  }
}

// A warp collective: waits until every lane named in mask has arrived in the same one.
EMU_RUNTIME inline uint64_t warp_op(Op op, unsigned mask, uint64_t value, int src) {
  Thread* t = g.current;
  const unsigned lane = t->linear % 32, base = t->linear - lane, warp = base / 32;
  const unsigned lanes = g.threads - base < 32 ? g.threads - base : 32;
  if (!(mask >> lane & 1)) fault("%s (warp %u lane %u) calls %s with mask 0x%08x, which does not name it",
                                 where(*t), warp, lane, op_name(op), mask);
  if (lanes < 32 && (mask >> lanes))
    fault("%s (warp %u lane %u) calls %s with mask 0x%08x, naming lane %d beyond the block's %u threads",
          where(*t), warp, lane, op_name(op), mask, 31 - __builtin_clz(mask), g.threads);
  t->op = op;
  t->mask = mask;
  t->value = value;
  t->src = src;
  unsigned arrived = 1;
  for (unsigned l = 0; l < lanes; ++l) {
    const Thread& o = g.thread[base + l];
    if (l == lane) continue;
    if ((mask >> l & 1) && o.state == State::done)
      fault("%s (warp %u lane %u) waits in %s with mask 0x%08x for lane %u, which has returned", where(*t), warp,
            lane, op_name(op), mask, l);
    if (o.state == State::warp && (o.mask & mask)) {
      if (o.mask != mask || o.op != op)
        fault("lanes %u and %u of warp %u meet in different warp collectives: %s with mask 0x%08x and %s with "
              "mask 0x%08x", l, lane, warp, op_name(o.op), o.mask, op_name(op), mask);
      ++arrived;
    }
  }
  t->state = State::warp;
  if (op == Op::syncwarp) EMU_RELEASE(g.sync + kSyncWarp + warp);
  if (arrived == (unsigned)__builtin_popcount(mask)) complete_warp_op(base, mask, op);
  else park();
  if (op == Op::syncwarp) EMU_ACQUIRE(g.sync + kSyncWarp + warp);
  return t->result;
}

EMU_RUNTIME inline void check_width(const char* what, int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    fault("%s: %s with width %d (must be a power of two up to 32)", where(*g.current), what, width);
}

EMU_RUNTIME inline uint64_t mix(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// A seeded permutation of [0, n) without a table (grids can have 2^63 blocks): a 4-round Feistel
// network over the next even power of two, cycle-walked back into range.
struct BlockOrder {
  uint64_t n, keys[4];
  unsigned half = 1;
  EMU_RUNTIME BlockOrder(uint64_t n_, uint64_t seed) : n(n_) {
    while (half < 32 && (1ull << (2 * half)) < n) ++half;
    for (uint64_t& k : keys) k = seed = mix(seed);
  }
  EMU_RUNTIME uint64_t operator()(uint64_t i) const {
    const uint64_t low = half == 32 ? ~0u : (1ull << half) - 1;
    do {
      uint64_t left = i >> half, right = i & low;
      for (uint64_t k : keys) {
        uint64_t next = left ^ (mix(right ^ k) & low);
        left = right;
        right = next;
      }
      i = left << half | right;
    } while (i >= n);
    return i;
  }
};

EMU_RUNTIME inline void deadlock() {
  unsigned at_barrier = 0, in_warp = 0;
  const Thread* example = nullptr;
  for (unsigned i = 0; i < g.threads; ++i) {
    at_barrier += g.thread[i].state == State::barrier;
    if (g.thread[i].state == State::warp && !in_warp++) example = &g.thread[i];
  }
  if (!example) return record("deadlock: %u threads wait at __syncthreads", at_barrier);
  const unsigned base = example->linear - example->linear % 32;
  unsigned missing = 0;
  while (missing < 31 && (g.thread[base + missing].state == State::warp || !(example->mask >> missing & 1)))
    ++missing;
  record("deadlock: %u threads wait at __syncthreads (line %d), %u in warp collectives; e.g. %s waits in %s with "
         "mask 0x%08x for lane %u, which is at __syncthreads", at_barrier, g.barrier_line, in_warp,
         where(*example), op_name(example->op), example->mask, missing);
}

// Runs the block g.block_idx to the end, or until a fault.
EMU_RUNTIME inline void run_block() {
  const unsigned n = g.threads, warps = (n + 31) / 32;
  g.done = g.waiting = 0;
  g.exited = -1;
  g.epoch = 0;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = g.thread[i];
    t.idx = {i % g.block.x, i / g.block.x % g.block.y, i / (g.block.x * g.block.y)};
    t.linear = i;
    t.state = State::ready;
    __atomic_store_n(&t.fenced, false, __ATOMIC_RELAXED);
    make_context(&t.context, g.stacks.stack(i), g.stacks.size, fiber_main);
  }
  unsigned order[32];
  for (unsigned w = 0; w < warps; ++w) order[w] = w;
  uint64_t random = mix(g.seed ^ mix(g.block_linear));
  while (g.done < n && !g.failed) {
    bool runnable = false;
    for (unsigned i = 0; i < n && !runnable; ++i) runnable = g.thread[i].state == State::ready;
    if (!runnable) return deadlock();
    for (unsigned w = warps - 1; w > 0; --w) {
      random = mix(random);
      unsigned j = random % (w + 1), swap = order[w];
      order[w] = order[j];
      order[j] = swap;
    }
    const uint64_t epoch = g.epoch;
    for (unsigned k = 0; k < warps && epoch == g.epoch && !g.failed; ++k) {
      const unsigned base = order[k] * 32, end = base + 32 < n ? base + 32 : n;
      for (bool again = true; again && epoch == g.epoch && !g.failed;) {  // the warp, as far as it goes
        again = false;
        for (unsigned i = base; i < end && epoch == g.epoch && !g.failed; ++i)
          if (g.thread[i].state == State::ready) {
            resume(&g.thread[i]);
            again = true;
          }
      }
    }
  }
}

EMU_RUNTIME inline void set_block(uint64_t linear) {
  g.block_linear = linear;
  g.block_idx = {unsigned(linear % g.grid.x), unsigned(linear / g.grid.x % g.grid.y),
                 unsigned(linear / ((uint64_t)g.grid.x * g.grid.y))};
}

}  // namespace emu

#include "launch.h"
