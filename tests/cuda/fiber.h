// Fibers for the kernel emulator: every CUDA thread of a block is a fiber with its own stack, and
// all of them take turns on the calling OS thread, so a run is deterministic and a switch costs a
// few nanoseconds (no syscall, unlike swapcontext, which saves the signal mask each time).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>

#ifndef EMU_RUNTIME  // runtime.h defines it: no TSan instrumentation in the runtime
#define EMU_RUNTIME
#endif

namespace emu {

#if defined(__x86_64__) && !defined(EMU_UCONTEXT)  // (EMU_UCONTEXT: the portable path, for testing it)
// A switched-out fiber is just its stack pointer: the callee-saved registers are pushed on its
// own stack. A fresh fiber's stack is laid out so that the first switch "returns" into
// emu_fiber_boot, which calls the entry function kept in r13.
struct Context {
  void* sp;
};
extern "C" void emu_fiber_switch(void** save_sp, void* load_sp) __attribute__((visibility("hidden")));
extern "C" void emu_fiber_boot() __attribute__((visibility("hidden")));
asm(R"(
  .pushsection .text
  .globl emu_fiber_switch
  .hidden emu_fiber_switch
  .type emu_fiber_switch, @function
emu_fiber_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_fiber_switch, .-emu_fiber_switch
  .globl emu_fiber_boot
  .hidden emu_fiber_boot
  .type emu_fiber_boot, @function
emu_fiber_boot:
  callq *%r13
  ud2
  .size emu_fiber_boot, .-emu_fiber_boot
  .popsection
)");

EMU_RUNTIME inline void make_context(Context* c, char* stack, size_t size, void (*entry)()) {
  uintptr_t top = (uintptr_t)(stack + size) & ~(uintptr_t)15;
  void** frame = (void**)(top - 72);  // 6 registers + the boot address; boot then calls with rsp % 16 == 0
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[2] = (void*)entry;  // r13
  frame[6] = (void*)emu_fiber_boot;
  c->sp = frame;
}

// The "memory" clobbers keep the compiler from caching shared memory across a switch.
EMU_RUNTIME inline void switch_context(Context* from, Context* to) {
  asm volatile("" ::: "memory");
  emu_fiber_switch(&from->sp, to->sp);
  asm volatile("" ::: "memory");
}
#else
}  // namespace emu
#include <ucontext.h>
namespace emu {
// Elsewhere: ucontext (slower, one syscall per switch, but portable).
struct Context {
  ucontext_t uc;
};
EMU_RUNTIME inline void make_context(Context* c, char* stack, size_t size, void (*entry)()) {
  getcontext(&c->uc);
  c->uc.uc_stack.ss_sp = stack;
  c->uc.uc_stack.ss_size = size;
  c->uc.uc_link = nullptr;
  makecontext(&c->uc, entry, 0);
}
EMU_RUNTIME inline void switch_context(Context* from, Context* to) { swapcontext(&from->uc, &to->uc); }
#endif

// Stacks, one per CUDA thread of a block, each with an inaccessible guard page at its low end so
// that an overflow faults (and is reported) instead of silently corrupting the next stack.
struct Stacks {
  char* base = nullptr;
  size_t count = 0, size = 0;

  EMU_RUNTIME static size_t page() { return (size_t)sysconf(_SC_PAGESIZE); }
  EMU_RUNTIME bool map(size_t n, size_t bytes) {
    size = bytes;
    void* p = mmap(nullptr, n * size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    base = (char*)p;
    count = n;
    for (size_t i = 0; i < n; ++i) mprotect(base + i * size, page(), PROT_NONE);
    return true;
  }
  EMU_RUNTIME void unmap() {
    if (base) munmap(base, count * size);
    base = nullptr;
    count = 0;
  }
  EMU_RUNTIME char* stack(size_t i) const { return base + i * size; }
  EMU_RUNTIME bool in_guard(const void* address) const {
    uintptr_t a = (uintptr_t)address, b = (uintptr_t)base;
    return a >= b && a < b + count * size && (a - b) % size < page();
  }
};

}  // namespace emu
