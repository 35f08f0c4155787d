// The host side of the emulator: the entry points Python calls through ctypes (the kernel
// registry's queries, and emu_launch in cuLaunchKernel's role), and, in normal mode, a kernel's
// memory faults turned into reports. Included at the end of runtime.h.
#pragma once

// The kernels of the module, generated after the .cu source (tests/cuda/emulator.py).
extern const emu::KernelEntry emu_registry[];
extern const int emu_registry_size;

namespace emu {

#if EMU_TSAN
inline thread_local char tls_anchor;

// One block on its own OS thread (see runtime.h for why), every step ordered for TSan.
EMU_RUNTIME inline void* block_thread(void*) {
  *(volatile char*)&tls_anchor = 0;  // this thread's TLS (the __shared__ variables) now, before any fiber
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);  // fresh stacks: TSan resets their shadow (fast)
  g.stacks.map(g.threads, kStackBytes);           // instead of imitating a write to all of them
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  g.sync = (char*)malloc(kSyncEnd + 1);  // fresh sync objects: nothing carries over from the last block
  g.scheduler_fiber = __tsan_get_current_fiber();
  void** fibers = g.fiber_pool + g.block_serial % 2 * g.threads;  // two sets, in turn (runtime.h)
  for (unsigned i = 0; i < g.threads; ++i) {
    if (!fibers[i]) fibers[i] = __tsan_create_fiber(0);
    char name[96];  // what a report calls the thread
    snprintf(name, sizeof name, "CUDA thread (%u,%u,%u) of block (%u,%u,%u)", i % g.block.x, i / g.block.x % g.block.y,
             i / (g.block.x * g.block.y), g.block_idx.x, g.block_idx.y, g.block_idx.z);
    __tsan_set_fiber_name(fibers[i], name);
    g.thread[i].fiber = fibers[i];
  }
  __tsan_release(g.sync + kSyncStart);
  run_block();
  for (unsigned i = 0; i < g.threads; ++i) {  // each thread's history goes to the host (launch end) and
    __tsan_switch_to_fiber(fibers[i], __tsan_switch_to_fiber_no_sync);  // to this OS thread, which
    __tsan_release(&g.launch_end);                                       // frees the block's memory next
    __tsan_release(g.sync + kSyncEnd);
    __tsan_switch_to_fiber(g.scheduler_fiber, __tsan_switch_to_fiber_no_sync);
    if (g.failed) {  // abandoned mid-kernel (their shadow call stacks are off): made afresh next time
      __tsan_destroy_fiber(fibers[i]);
      fibers[i] = nullptr;
    }
  }
  __tsan_acquire(g.sync + kSyncEnd);
  __tsan_release(&g.launch_end);  // (a fault message this thread recorded)
  g.stacks.unmap();
  free(g.sync);
  g.block_finished = 1;
  syscall(SYS_futex, &g.block_finished, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
  return nullptr;
}

EMU_RUNTIME inline void run_blocks(const BlockOrder& order, uint64_t total) {
  pthread_attr_t detached;
  pthread_attr_init(&detached);
  pthread_attr_setdetachstate(&detached, PTHREAD_CREATE_DETACHED);
  for (uint64_t i = 0; i < total && !g.failed; ++i) {
    set_block(order(i));
    g.block_serial = i;
    g.block_finished = 0;
    pthread_t thread;
    if (pthread_create(&thread, &detached, block_thread, nullptr) != 0) {
      record("could not start an OS thread for the block");
      break;
    }
    while (!g.block_finished) syscall(SYS_futex, &g.block_finished, FUTEX_WAIT_PRIVATE, 0, nullptr, nullptr, 0);
  }
  pthread_attr_destroy(&detached);
}
#else
// A kernel's invalid memory access, stack overflow or integer division by zero arrives as a
// signal on the fiber that did it: record it and jump back to the launch, abandoning the block.
constexpr int kFaultSignals[3] = {SIGSEGV, SIGBUS, SIGFPE};
inline struct sigaction old_actions[3];

inline void on_fault_signal(int signal, siginfo_t* info, void*) {
  Thread* t = g.current;
  if (!t) {  // not the kernel's: give it to the handler there was before (it happens again)
    for (int i = 0; i < 3; ++i)
      if (kFaultSignals[i] == signal) sigaction(signal, &old_actions[i], nullptr);
    return;
  }
  const char* what = signal == SIGFPE                     ? "arithmetic exception (integer division by zero?)"
                     : g.stacks.in_guard(info->si_addr) ? "stack overflow (a thread has %zu KB of stack)"
                     : signal == SIGBUS                   ? "bus error"
                                                          : "invalid memory access";
  char text[96];
  snprintf(text, sizeof text, what, kStackBytes >> 10);
  record("%s: %s at address %p", where(*t), text, info->si_addr);
  g.current = nullptr;
  siglongjmp(g.fault_jump, 1);
}

// Installs the handler (on its own stack: the fault may be a fiber's stack overflow) for a launch.
struct FaultSignals {
  stack_t old_stack;
  FaultSignals() {
    static char altstack[64 << 10];
    stack_t stack = {};
    stack.ss_sp = altstack;
    stack.ss_size = sizeof altstack;
    sigaltstack(&stack, &old_stack);
    struct sigaction action = {};
    action.sa_sigaction = on_fault_signal;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &action, &old_actions[i]);
  }
  ~FaultSignals() {
    for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &old_actions[i], nullptr);
    sigaltstack(&old_stack, nullptr);
  }
};

inline void run_blocks(const BlockOrder& order, uint64_t total) {
  if (g.stacks.count < g.threads) {  // mapped once, for the largest block so far, and reused
    g.stacks.unmap();
    if (!g.stacks.map(g.threads, kStackBytes)) return record("could not map %u fiber stacks", g.threads);
  }
  FaultSignals signals;
  if (sigsetjmp(g.fault_jump, 1) == 0)
    for (uint64_t i = 0; i < total && !g.failed; ++i) {
      set_block(order(i));
      run_block();
    }
}
#endif

}  // namespace emu

// Everything else is hidden (-fvisibility=hidden): each module keeps its own runtime state, even
// with several modules loaded.
#define EMU_EXPORT __attribute__((visibility("default")))
extern "C" {
EMU_EXPORT int emu_kernel_count() { return emu_registry_size; }
EMU_EXPORT const char* emu_kernel_name(int k) { return emu_registry[k].name; }
EMU_EXPORT int emu_param_count(int k) { return emu_registry[k].param_count; }
EMU_EXPORT int emu_param_size(int k, int i) { return emu_registry[k].sizes[i]; }
EMU_EXPORT int emu_param_kind(int k, int i) { return emu_registry[k].kinds[i]; }

// Runs kernel k over the grid, synchronously; args[i] points at parameter i's bytes (checked by
// the caller). Returns 0, or 1 with a fault described in message.
// fiber_pool: 2 * 1024 TSan contexts shared by every module of the process (TSan mode).
EMU_EXPORT EMU_RUNTIME int emu_launch(int k, const unsigned* grid, const unsigned* block, const void* const* args,
                                      unsigned long long seed, void** fiber_pool, char* message, int message_size) {
  using emu::g;
  g.kernel = &emu_registry[k];
  g.args = args;
  g.seed = seed;
  g.fiber_pool = fiber_pool;
  g.grid = dim3(grid[0], grid[1], grid[2]);
  g.block = dim3(block[0], block[1], block[2]);
  g.threads = block[0] * block[1] * block[2];
  g.current = nullptr;
  g.failed = false;
  g.message[0] = 0;
  const uint64_t total = (uint64_t)grid[0] * grid[1] * grid[2];
  EMU_RELEASE(&g.launch_start);
  emu::run_blocks(emu::BlockOrder(total, emu::mix(seed)), total);
  EMU_ACQUIRE(&g.launch_end);
  snprintf(message, message_size, "%s", g.message);
  return g.failed ? 1 : 0;
}
}
