/* tests/emu/cuda_shim.hpp — CUDA C compiled by the host C++ compiler (tests/emu/emu.h).
 *
 * Included first (-include) when tests/emu/emu_compiler.c builds a module with
 * -DCMAEC_EMULATED. A launch runs its grid block after block on the calling OS
 * thread; a block's threads are fibers (a hand-written x86-64 context switch, or
 * ucontext elsewhere) that yield at __syncthreads and at warp collectives, so a
 * block runs on one core with CUDA's semantics for barriers, shared memory,
 * shuffles, votes and atomics. Launches of one module take turns (a lock);
 * modules run concurrently. The module's source is followed by the table of
 * its __global__ functions (cm_emu_table, written by emu_compiler.c); the module
 * exports cm_emu_params and cm_emu_launch. */
#ifndef CMAEC_EMU_CUDA_SHIM_HPP
#define CMAEC_EMU_CUDA_SHIM_HPP

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <type_traits>
#include <unistd.h>
#include <utility>

#if defined(__SANITIZE_ADDRESS__)
#define CM_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CM_EMU_ASAN 1
#endif
#endif
#ifdef CM_EMU_ASAN
extern "C" void __sanitizer_start_switch_fiber(void **fake_stack_save, const void *bottom,
                                               size_t size);
extern "C" void __sanitizer_finish_switch_fiber(void *fake_stack_save, const void **bottom_old,
                                                size_t *size_old);
extern "C" void __asan_unpoison_memory_region(void const volatile *addr, size_t size);
#endif
/* the hand-written switch on x86-64 (CM_EMU_UCONTEXT: ucontext's, to compare) */
#if defined(__x86_64__) && !defined(CM_EMU_UCONTEXT)
#define CM_EMU_SWITCH_ASM 1
#else
#define CM_EMU_SWITCH_ASM 0
#endif
#if !CM_EMU_SWITCH_ASM
#include <ucontext.h>
#endif

/* ---- CUDA's keywords and built-in variables -------------------------------- */

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
/* one block of a module runs at a time (cm_emu_launch holds the module's lock): a
 * block's shared arrays are the function's statics. No thread_local anywhere:
 * from a dlopen'ed module each access to one may call __tls_get_addr. */
#define __shared__ static
#define __constant__
#define warpSize 32

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(8) int2 {
  int x, y;
};
struct __align__(16) int4 {
  int x, y, z, w;
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
static inline float2 make_float2(float x, float y) {
  return {x, y};
}
static inline float4 make_float4(float x, float y, float z, float w) {
  return {x, y, z, w};
}
static inline int2 make_int2(int x, int y) {
  return {x, y};
}
static inline int4 make_int4(int x, int y, int z, int w) {
  return {x, y, z, w};
}
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
  return {x, y, z, w};
}

/* ---- math and bit intrinsics ---------------------------------------------- */

template <class A, class B> static inline typename std::common_type<A, B>::type min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B> static inline typename std::common_type<A, B>::type max(A a, B b) {
  return a < b ? b : a;
}
static inline float rsqrtf(float x) {
  return 1.0f / sqrtf(x);
}
static inline double rsqrt(double x) {
  return 1.0 / sqrt(x);
}
/* glibc declares these names (its own aliases): CUDA's fast forms are the plain ones */
#define __expf expf
#define __logf logf
#define __sinf sinf
#define __cosf cosf
#define __powf powf
static inline float __fdividef(float a, float b) {
  return a / b;
}
static inline float __frcp_rn(float x) {
  return 1.0f / x;
}
static inline float __fsqrt_rn(float x) {
  return sqrtf(x);
}
static inline float __fadd_rn(float a, float b) {
  return a + b;
}
static inline float __fmul_rn(float a, float b) {
  return a * b;
}
static inline float __fmaf_rn(float a, float b, float c) {
  return fmaf(a, b, c);
}
static inline float __saturatef(float x) {
  return x < 0 ? 0 : x > 1 ? 1 : x == x ? x : 0;
}
static inline int __float2int_rn(float x) {
  return (int)nearbyintf(x);
}
static inline int __float2int_rz(float x) {
  return (int)x;
}
static inline float __int2float_rn(int x) {
  return (float)x;
}

template <class To, class From> static inline To cm_emu_bits(From f) {
  static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
  To t;
  memcpy(&t, &f, sizeof t);
  return t;
}
static inline float __int_as_float(int i) {
  return cm_emu_bits<float>(i);
}
static inline int __float_as_int(float f) {
  return cm_emu_bits<int>(f);
}
static inline float __uint_as_float(unsigned i) {
  return cm_emu_bits<float>(i);
}
static inline unsigned __float_as_uint(float f) {
  return cm_emu_bits<unsigned>(f);
}
static inline double __longlong_as_double(long long i) {
  return cm_emu_bits<double>(i);
}
static inline long long __double_as_longlong(double d) {
  return cm_emu_bits<long long>(d);
}
static inline int __clz(int x) {
  return x ? __builtin_clz((unsigned)x) : 32;
}
static inline int __clzll(long long x) {
  return x ? __builtin_clzll((unsigned long long)x) : 64;
}
static inline int __popc(unsigned x) {
  return __builtin_popcount(x);
}
static inline int __popcll(unsigned long long x) {
  return __builtin_popcountll(x);
}
static inline int __ffs(int x) {
  return __builtin_ffs(x);
}
static inline int __ffsll(long long x) {
  return __builtin_ffsll(x);
}
static inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; i++, x >>= 1) r = (r << 1) | (x & 1u);
  return r;
}
static inline unsigned __umulhi(unsigned a, unsigned b) {
  return (unsigned)(((unsigned long long)a * b) >> 32);
}
static inline int __mulhi(int a, int b) {
  return (int)(((long long)a * b) >> 32);
}
template <class T> static inline T __ldg(const T *p) {
  return *p;
}

/* ---- atomics: real ones, since launches on two OS threads may share memory --- */

template <class T> static inline T cm_emu_atomic_update(T *p, T (*op)(T, T), T v) {
  typedef typename std::conditional<sizeof(T) == 8, unsigned long long, unsigned>::type U;
  static_assert(sizeof(T) == sizeof(U), "32- or 64-bit atomics");
  U *u = (U *)p;
  U old = __atomic_load_n(u, __ATOMIC_RELAXED);
  for (;;) {
    U next = cm_emu_bits<U>(op(cm_emu_bits<T>(old), v));
    if (__atomic_compare_exchange_n(u, &old, next, true, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED))
      return cm_emu_bits<T>(old);
  }
}
template <class T> static inline T cm_emu_op_add(T a, T b) {
  return a + b;
}
template <class T> static inline T cm_emu_op_min(T a, T b) {
  return b < a ? b : a;
}
template <class T> static inline T cm_emu_op_max(T a, T b) {
  return a < b ? b : a;
}
static inline float atomicAdd(float *p, float v) {
  return cm_emu_atomic_update<float>(p, cm_emu_op_add<float>, v);
}
static inline double atomicAdd(double *p, double v) {
  return cm_emu_atomic_update<double>(p, cm_emu_op_add<double>, v);
}
#define CM_EMU_INT_ATOMICS(T)                                                                      \
  static inline T atomicAdd(T *p, T v) {                                                           \
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                             \
  }                                                                                                \
  static inline T atomicSub(T *p, T v) {                                                           \
    return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);                                             \
  }                                                                                                \
  static inline T atomicExch(T *p, T v) {                                                          \
    return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                            \
  }                                                                                                \
  static inline T atomicAnd(T *p, T v) {                                                           \
    return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);                                             \
  }                                                                                                \
  static inline T atomicOr(T *p, T v) {                                                            \
    return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                              \
  }                                                                                                \
  static inline T atomicXor(T *p, T v) {                                                           \
    return __atomic_fetch_xor(p, v, __ATOMIC_SEQ_CST);                                             \
  }                                                                                                \
  static inline T atomicMin(T *p, T v) {                                                           \
    return cm_emu_atomic_update<T>(p, cm_emu_op_min<T>, v);                                        \
  }                                                                                                \
  static inline T atomicMax(T *p, T v) {                                                           \
    return cm_emu_atomic_update<T>(p, cm_emu_op_max<T>, v);                                        \
  }                                                                                                \
  static inline T atomicCAS(T *p, T compare, T v) {                                                \
    __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);        \
    return compare;                                                                                \
  }
CM_EMU_INT_ATOMICS(int)
CM_EMU_INT_ATOMICS(unsigned)
CM_EMU_INT_ATOMICS(long long)
CM_EMU_INT_ATOMICS(unsigned long long)
static inline unsigned short atomicCAS(unsigned short *p, unsigned short compare,
                                       unsigned short v) {
  __atomic_compare_exchange_n(p, &compare, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return compare;
}
static inline float atomicExch(float *p, float v) {
  return cm_emu_bits<float>(atomicExch((unsigned *)p, cm_emu_bits<unsigned>(v)));
}
static inline unsigned atomicInc(unsigned *p, unsigned limit) {
  return cm_emu_atomic_update<unsigned>(
      p, [](unsigned old, unsigned lim) { return old >= lim ? 0u : old + 1; }, limit);
}
static inline void __threadfence() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
static inline void __threadfence_block() {
  __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* ---- fibers -------------------------------------------------------------- */

enum cm_emu_fiber_state { CM_EMU_READY, CM_EMU_WAIT_BLOCK, CM_EMU_WAIT_WARP, CM_EMU_DONE };
struct cm_emu_fiber {
  void *sp; /* the saved stack pointer while switched out */
#if !CM_EMU_SWITCH_ASM
  ucontext_t uc;
#endif
  char *stack_lo;
  size_t stack_bytes;
  void *asan_fake_stack;
  int state;
  bool released; /* its stack given back (cm_emu_release_stacks): reset before use */
  unsigned wait_gen;
  unsigned tid, warp, lane;
  uint3 idx;
};

/* A warp collective's slot: one lane's posted value, tagged with the warp's
 * generation so a lane that exited (or never existed) is told apart. */
struct cm_emu_slot {
  unsigned long long words[6]; /* an mma's fragments and accumulators: 10 words */
  unsigned gen;
};

struct cm_emu_entry {
  const char *name;
  int n_params;
  void (*call)(void **params);
};

#define CM_EMU_MAX_THREADS 1024
#define CM_EMU_STACK_BYTES (128u << 10)
/* Per module: the fibers (grown to the largest block seen; their
 * stacks reused by every block), the block's barrier and the warps' rendezvous. */
struct cm_emu_state {
  cm_emu_fiber fibers[CM_EMU_MAX_THREADS];
  unsigned n_fibers;                    /* fibers with a stack */
  char *stack_maps[CM_EMU_MAX_THREADS]; /* one mapping per growth */
  size_t stack_map_bytes[CM_EMU_MAX_THREADS];
  int n_stack_maps;
  cm_emu_fiber *cur;
  void *sched_sp;
#if !CM_EMU_SWITCH_ASM
  ucontext_t sched_uc;
#endif
  void *sched_fake_stack;
  const void *sched_stack_lo;
  size_t sched_stack_bytes;
  const cm_emu_entry *entry;
  void **params;
  unsigned block_live, block_arrived, block_gen;
  unsigned warp_live[CM_EMU_MAX_THREADS / 32], warp_arrived[CM_EMU_MAX_THREADS / 32];
  unsigned warp_gen[CM_EMU_MAX_THREADS / 32];
  cm_emu_slot slots[2][CM_EMU_MAX_THREADS];
  unsigned char *dynamic_shared;
  size_t dynamic_shared_bytes;
  struct cm_emu_async_queue *async; /* per thread, allocated by the module's first cp.async */
  int fault;                        /* a CUresult a helper reported (misaligned address) */
};
static cm_emu_state *cm_emu_st;
static pthread_mutex_t cm_emu_launch_mu = PTHREAD_MUTEX_INITIALIZER; /* one launch at a time */

#if CM_EMU_SWITCH_ASM
/* Saves the callee-saved registers on the current stack, stores its pointer in
 * *save, switches to stack `to` and restores what is saved there. No signal
 * mask syscall (swapcontext's), which would dominate a barrier's cost. */
extern "C" void cm_emu_switch(void **save, void *to);
__asm__(".text\n"
        ".globl cm_emu_switch\n"
        ".hidden cm_emu_switch\n"
        ".type cm_emu_switch,@function\n"
        "cm_emu_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size cm_emu_switch, .-cm_emu_switch\n");
#endif

static void cm_emu_fiber_main();

/* Sets f to start cm_emu_fiber_main on its next resume. */
/* The stacks lie side by side in one mapping above one guard page (a guard page
 * each would split it into two mappings a fiber, and a program's hundreds of
 * modules would pass the kernel's limit on mappings, vm.max_map_count): a canary
 * at each stack's low end, checked after every block, catches an overflow. */
#define CM_EMU_CANARY 0x5ca1ab1ec0ffee11ull
#define CM_EMU_CANARY_WORDS 8
static void cm_emu_fiber_reset(cm_emu_fiber *f) {
#ifdef CM_EMU_ASAN
  __asan_unpoison_memory_region(f->stack_lo, f->stack_bytes);
#endif
  for (int w = 0; w < CM_EMU_CANARY_WORDS; w++) ((uint64_t *)f->stack_lo)[w] = CM_EMU_CANARY;
#if CM_EMU_SWITCH_ASM
  uintptr_t top = ((uintptr_t)f->stack_lo + f->stack_bytes) & ~(uintptr_t)15;
  void **sp = (void **)(top - 64);
  for (int i = 0; i < 6; i++) sp[i] = 0; /* r15 r14 r13 r12 rbx rbp */
  sp[6] = (void *)cm_emu_fiber_main;     /* ret: entered with rsp = top - 8, as a call does */
  sp[7] = 0;
  f->sp = sp;
#else
  getcontext(&f->uc);
  f->uc.uc_stack.ss_sp = f->stack_lo;
  f->uc.uc_stack.ss_size = f->stack_bytes;
  f->uc.uc_link = 0;
  makecontext(&f->uc, cm_emu_fiber_main, 0);
#endif
}

/* Scheduler -> fiber f, until f yields. */
static void cm_emu_resume(cm_emu_state *st, cm_emu_fiber *f) {
  st->cur = f;
  threadIdx = f->idx;
#ifdef CM_EMU_ASAN
  __sanitizer_start_switch_fiber(&st->sched_fake_stack, f->stack_lo, f->stack_bytes);
#endif
#if CM_EMU_SWITCH_ASM
  cm_emu_switch(&st->sched_sp, f->sp);
#else
  swapcontext(&st->sched_uc, &f->uc);
#endif
#ifdef CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(st->sched_fake_stack, 0, 0);
#endif
}

/* Fiber -> scheduler; returns when the scheduler resumes it. */
static void cm_emu_yield(cm_emu_state *st, cm_emu_fiber *f) {
#ifdef CM_EMU_ASAN
  __sanitizer_start_switch_fiber(&f->asan_fake_stack, st->sched_stack_lo, st->sched_stack_bytes);
#endif
#if CM_EMU_SWITCH_ASM
  cm_emu_switch(&f->sp, st->sched_sp);
#else
  swapcontext(&f->uc, &st->sched_uc);
#endif
#ifdef CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake_stack, &st->sched_stack_lo, &st->sched_stack_bytes);
#endif
}

static void cm_emu_release_block(cm_emu_state *st) {
  st->block_arrived = 0;
  st->block_gen++;
}
static void cm_emu_release_warp(cm_emu_state *st, unsigned w) {
  st->warp_arrived[w] = 0;
  st->warp_gen[w]++;
}

static void cm_emu_async_complete(cm_emu_state *st, unsigned tid, int keep_groups);

/* A thread that returned counts as arrived at every later barrier; its copies in flight land. */
static void cm_emu_thread_exit(cm_emu_state *st, cm_emu_fiber *f) {
  cm_emu_async_complete(st, f->tid, -1);
  f->state = CM_EMU_DONE;
  st->block_live--;
  if (st->block_arrived && st->block_arrived == st->block_live) cm_emu_release_block(st);
  unsigned w = f->warp;
  st->warp_live[w]--;
  if (st->warp_arrived[w] && st->warp_arrived[w] == st->warp_live[w]) cm_emu_release_warp(st, w);
}

static void cm_emu_fiber_main() {
  cm_emu_state *st = cm_emu_st;
#ifdef CM_EMU_ASAN
  __sanitizer_finish_switch_fiber(0, &st->sched_stack_lo, &st->sched_stack_bytes);
#endif
  for (;;) {
    cm_emu_fiber *f = st->cur;
    st->entry->call(st->params);
    cm_emu_thread_exit(st, f);
    cm_emu_yield(st, f);
  }
}

static void __syncthreads() {
  cm_emu_state *st = cm_emu_st;
  if (++st->block_arrived == st->block_live) {
    cm_emu_release_block(st); /* the last to arrive goes on without a switch */
    return;
  }
  cm_emu_fiber *f = st->cur;
  f->state = CM_EMU_WAIT_BLOCK;
  f->wait_gen = st->block_gen;
  cm_emu_yield(st, f);
}

/* The warp's rendezvous: returns once every live lane of the caller's warp has arrived. */
static void cm_emu_warp_barrier(cm_emu_state *st, cm_emu_fiber *f) {
  unsigned w = f->warp;
  if (++st->warp_arrived[w] == st->warp_live[w]) {
    cm_emu_release_warp(st, w);
    return;
  }
  f->state = CM_EMU_WAIT_WARP;
  f->wait_gen = st->warp_gen[w];
  cm_emu_yield(st, f);
}
static void __syncwarp(unsigned mask = 0xffffffffu) {
  (void)mask;
  cm_emu_warp_barrier(cm_emu_st, cm_emu_st->cur);
}

/* Posts bytes of v as this lane's slot, waits for the warp; returns the
 * generation the slots were posted under. Slots alternate between two sets, so
 * the next collective's posts never overwrite what a slower lane still reads. */
static unsigned cm_emu_warp_post(const void *v, size_t bytes) {
  cm_emu_state *st = cm_emu_st;
  cm_emu_fiber *f = st->cur;
  unsigned gen = st->warp_gen[f->warp];
  cm_emu_slot *s = &st->slots[gen & 1][f->tid];
  memcpy(s->words, v, bytes);
  s->gen = gen;
  cm_emu_warp_barrier(st, f);
  return gen;
}
/* Lane `lane` of the caller's warp's slot of generation gen; NULL when that lane
 * did not post (it exited, or lies beyond the block). */
static const cm_emu_slot *cm_emu_warp_slot(unsigned gen, unsigned lane) {
  cm_emu_state *st = cm_emu_st;
  unsigned tid = st->cur->warp * 32 + lane;
  if (lane >= 32 || tid >= CM_EMU_MAX_THREADS) return 0;
  const cm_emu_slot *s = &st->slots[gen & 1][tid];
  return s->gen == gen ? s : 0;
}
static unsigned cm_emu_lane() {
  return cm_emu_st->cur->lane;
}

template <class T> static T cm_emu_shfl(T v, unsigned src_lane, unsigned lo, unsigned hi) {
  static_assert(sizeof(T) <= sizeof(cm_emu_slot::words), "a shuffled value fits a slot");
  unsigned gen = cm_emu_warp_post(&v, sizeof v);
  if (src_lane < lo || src_lane >= hi) return v;
  const cm_emu_slot *s = cm_emu_warp_slot(gen, src_lane);
  if (!s) return v; /* CUDA leaves it undefined: the caller's own value */
  T r;
  memcpy(&r, s->words, sizeof r);
  return r;
}
/* width: a power of two <= 32 splitting the warp into segments */
template <class T> static T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  (void)mask;
  unsigned lane = cm_emu_lane(), lo = lane & ~(unsigned)(width - 1);
  return cm_emu_shfl(v, lo + ((unsigned)src & (unsigned)(width - 1)), lo, lo + (unsigned)width);
}
template <class T> static T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  (void)mask;
  unsigned lane = cm_emu_lane(), lo = lane & ~(unsigned)(width - 1);
  return cm_emu_shfl(v, lane - delta, lo, lo + (unsigned)width);
}
template <class T> static T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  (void)mask;
  unsigned lane = cm_emu_lane(), lo = lane & ~(unsigned)(width - 1);
  return cm_emu_shfl(v, lane + delta, lo, lo + (unsigned)width);
}
template <class T> static T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  (void)mask;
  unsigned lane = cm_emu_lane(), lo = lane & ~(unsigned)(width - 1);
  return cm_emu_shfl(v, lane ^ (unsigned)lane_mask, lo, lo + (unsigned)width);
}
static unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned long long p = pred != 0;
  unsigned gen = cm_emu_warp_post(&p, sizeof p), bits = 0;
  for (unsigned l = 0; l < 32; l++) {
    const cm_emu_slot *s = cm_emu_warp_slot(gen, l);
    if (s && s->words[0]) bits |= 1u << l;
  }
  return bits & mask;
}
static int __any_sync(unsigned mask, int pred) {
  return __ballot_sync(mask, pred) != 0;
}
static int __all_sync(unsigned mask, int pred) {
  unsigned long long p = pred != 0;
  unsigned gen = cm_emu_warp_post(&p, sizeof p);
  for (unsigned l = 0; l < 32; l++) {
    const cm_emu_slot *s = cm_emu_warp_slot(gen, l);
    if (s && (mask >> l & 1u) && !s->words[0]) return 0;
  }
  return 1;
}
static unsigned __activemask() {
  unsigned long long one = 1;
  unsigned gen = cm_emu_warp_post(&one, sizeof one), bits = 0;
  for (unsigned l = 0; l < 32; l++)
    if (cm_emu_warp_slot(gen, l)) bits |= 1u << l;
  return bits;
}
/* Every lane's N words (lanes that did not post: zeros). */
template <int N> static void cm_emu_warp_gather(const unsigned (&mine)[N], unsigned (&all)[32][N]) {
  static_assert(N * sizeof(unsigned) <= sizeof(cm_emu_slot::words), "the words fit a slot");
  unsigned gen = cm_emu_warp_post(mine, sizeof mine);
  for (unsigned l = 0; l < 32; l++) {
    const cm_emu_slot *s = cm_emu_warp_slot(gen, l);
    if (s)
      memcpy(all[l], s->words, sizeof all[l]);
    else
      memset(all[l], 0, sizeof all[l]);
  }
}

/* A warp-wide operation computed once: each lane posts N words; the last lane to
 * arrive runs combine over every lane's words (zeros for lanes that did not
 * post), which writes each lane's M words of result; each lane gets its own.
 * What an mma.sync is: one tile product shared by the warp's 32 lanes. */
template <int N, int M>
static void cm_emu_warp_compute(const unsigned (&mine)[N], unsigned (&result)[M],
                                void (*combine)(const unsigned (*in)[N], unsigned (*out)[M])) {
  static_assert(N * sizeof(unsigned) <= sizeof(cm_emu_slot::words) &&
                    M * sizeof(unsigned) <= sizeof(cm_emu_slot::words),
                "the words fit a slot");
  cm_emu_state *st = cm_emu_st;
  cm_emu_fiber *f = st->cur;
  unsigned w = f->warp, gen = st->warp_gen[w];
  cm_emu_slot *s = &st->slots[gen & 1][f->tid];
  memcpy(s->words, mine, sizeof mine);
  s->gen = gen;
  if (++st->warp_arrived[w] == st->warp_live[w]) {
    unsigned in[32][N], out[32][M];
    for (unsigned l = 0; l < 32; l++) {
      const cm_emu_slot *o = cm_emu_warp_slot(gen, l);
      if (o)
        memcpy(in[l], o->words, sizeof in[l]);
      else
        memset(in[l], 0, sizeof in[l]);
    }
    combine(in, out);
    /* the results replace the posts: every lane has posted, none reads them again */
    for (unsigned l = 0; l < 32; l++)
      if (cm_emu_warp_slot(gen, l))
        memcpy(st->slots[gen & 1][w * 32 + l].words, out[l], sizeof out[l]);
    cm_emu_release_warp(st, w);
  } else {
    f->state = CM_EMU_WAIT_WARP;
    f->wait_gen = gen;
    cm_emu_yield(st, f);
  }
  memcpy(result, s->words, sizeof result);
}

/* ---- the tensor-core pipeline's PTX (the prelude's cm_ldmatrix, cm_cp_async*) -------- */

/* A fault a helper found (CUDA would stop the kernel): the launch returns it. */
static void cm_emu_fault(int curesult) {
  if (!cm_emu_st->fault) cm_emu_st->fault = curesult;
}
#define CM_EMU_MISALIGNED 716 /* CUDA_ERROR_MISALIGNED_ADDRESS */

/* ldmatrix.sync.aligned.m8n8.xNMAT[.trans].shared.b16, the warp's load done at once by the
 * last lane to arrive (no lane's later store can reach it): lane 8i + r names row r of matrix
 * i (8 b16, 16-byte aligned); register i of lane l gets matrix i's elements (l / 4, 2 (l % 4))
 * and (l / 4, 2 (l % 4) + 1), or with TRANS (2 (l % 4), l / 4) and (2 (l % 4) + 1, l / 4). */
template <int NMAT, bool TRANS>
static void cm_emu_ldmatrix_warp(const unsigned (*in)[2], unsigned (*out)[NMAT]) {
  const unsigned short *rows[NMAT][8];
  for (int i = 0; i < NMAT; i++)
    for (int r = 0; r < 8; r++) {
      const unsigned *w = in[i * 8 + r];
      uintptr_t a = (uintptr_t)w[0] | (uintptr_t)w[1] << 32;
      static const unsigned short none[8] = {0};
      if (a % 16 || !a) cm_emu_fault(CM_EMU_MISALIGNED); /* !a: that lane did not take part */
      rows[i][r] = a && a % 16 == 0 ? (const unsigned short *)a : none;
    }
  for (unsigned l = 0; l < 32; l++)
    for (int i = 0; i < NMAT; i++) {
      unsigned g = l >> 2, c = 2 * (l & 3u);
      unsigned short lo = TRANS ? rows[i][c][g] : rows[i][g][c];
      unsigned short hi = TRANS ? rows[i][c + 1][g] : rows[i][g][c + 1];
      out[l][i] = (unsigned)lo | (unsigned)hi << 16;
    }
}
template <int NMAT, bool TRANS> static void cm_emu_ldmatrix(unsigned *r, const void *row) {
  uintptr_t a = (uintptr_t)row;
  const unsigned mine[2] = {(unsigned)a, (unsigned)(a >> 32)};
  unsigned res[NMAT];
  cm_emu_warp_compute<2, NMAT>(mine, res, cm_emu_ldmatrix_warp<NMAT, TRANS>);
  for (int i = 0; i < NMAT; i++) r[i] = res[i];
}

/* cp.async: each thread's copies wait in its queue, tagged with the group commit_group will
 * close, and land (src_bytes copied, the rest of the 16 zeroed) at the wait_group that covers
 * them, at the thread's exit, or when the queue is full (the oldest first): a kernel that reads
 * its shared tile before waiting sees the old contents, as it may on a GPU. */
#define CM_EMU_ASYNC_MAX 64
struct cm_emu_async_copy {
  void *dst;
  const void *src;
  unsigned src_bytes, group;
};
struct cm_emu_async_queue {
  cm_emu_async_copy copies[CM_EMU_ASYNC_MAX];
  unsigned n, head; /* a ring: n copies from head */
  unsigned committed;
};
static void cm_emu_async_land(const cm_emu_async_copy *c) {
  memcpy(c->dst, c->src, c->src_bytes);
  memset((char *)c->dst + c->src_bytes, 0, 16 - c->src_bytes);
}
/* Lands thread tid's copies of every group but the newest keep_groups (-1: all, the open one
 * too). Groups close in issue order, so those are a prefix of the ring. */
static void cm_emu_async_complete(cm_emu_state *st, unsigned tid, int keep_groups) {
  if (!st->async) return;
  cm_emu_async_queue *q = &st->async[tid];
  while (q->n) {
    const cm_emu_async_copy *c = &q->copies[q->head];
    if (keep_groups >= 0 && c->group + (unsigned)keep_groups >= q->committed) break;
    cm_emu_async_land(c);
    q->head = (q->head + 1) % CM_EMU_ASYNC_MAX;
    q->n--;
  }
  if (keep_groups < 0) q->committed = 0;
}
static void cm_emu_cp_async16(void *dst, const void *src, unsigned src_bytes) {
  cm_emu_state *st = cm_emu_st;
  if ((uintptr_t)dst % 16 || (src_bytes && (uintptr_t)src % 16) || src_bytes > 16) {
    cm_emu_fault(CM_EMU_MISALIGNED);
    return;
  }
  if (!st->async) {
    st->async = (cm_emu_async_queue *)calloc(CM_EMU_MAX_THREADS, sizeof *st->async);
    if (!st->async) {
      cm_emu_fault(2); /* CUDA_ERROR_OUT_OF_MEMORY */
      return;
    }
  }
  cm_emu_async_queue *q = &st->async[st->cur->tid];
  if (q->n == CM_EMU_ASYNC_MAX) { /* full: the oldest lands now */
    cm_emu_async_land(&q->copies[q->head]);
    q->head = (q->head + 1) % CM_EMU_ASYNC_MAX;
    q->n--;
  }
  q->copies[(q->head + q->n++) % CM_EMU_ASYNC_MAX] = {dst, src, src_bytes, q->committed};
}
static void cm_emu_cp_async_commit() {
  cm_emu_state *st = cm_emu_st;
  if (st->async) st->async[st->cur->tid].committed++;
}
static void cm_emu_cp_async_wait(int keep_groups) {
  cm_emu_async_complete(cm_emu_st, cm_emu_st->cur->tid, keep_groups);
}

/* The dynamic shared memory of the running launch (`extern __shared__`, which
 * emu_compiler.c rewrites into a pointer to this). */
static unsigned char *cm_emu_dynamic_shared() {
  return cm_emu_st->dynamic_shared;
}

/* ---- launching --------------------------------------------------------------- */

template <class... A, size_t... I>
static void cm_emu_call_with(void (*fn)(A...), void **params, std::index_sequence<I...>) {
  fn(*(A *)params[I]...);
}
template <class... A> static void cm_emu_call(void (*fn)(A...), void **params) {
  cm_emu_call_with(fn, params, std::index_sequence_for<A...>());
}
template <class... A> static constexpr int cm_emu_arity(void (*)(A...)) {
  return (int)sizeof...(A);
}
/* One entry of cm_emu_table per __global__ function (written by emu_compiler.c). */
#define CM_EMU_ENTRY(fn)                                                                           \
  {                                                                                                \
#fn, cm_emu_arity(fn), [](void **p) { cm_emu_call(fn, p); }                                    \
  }
extern const cm_emu_entry cm_emu_table[];
extern const int cm_emu_table_size;

static const cm_emu_entry *cm_emu_find(const char *name) {
  for (int i = 0; i < cm_emu_table_size; i++)
    if (!strcmp(cm_emu_table[i].name, name)) return &cm_emu_table[i];
  return 0;
}

static cm_emu_state *cm_emu_module_state() {
  if (cm_emu_st) return cm_emu_st;
  cm_emu_state *st = (cm_emu_state *)calloc(1, sizeof *st);
  if (!st) return 0;
  for (int p = 0; p < 2; p++)
    for (int t = 0; t < CM_EMU_MAX_THREADS; t++) st->slots[p][t].gen = ~0u;
  return cm_emu_st = st;
}

/* Stacks for fibers up to n: one mapping, each stack above a guard page. */
static bool cm_emu_grow(cm_emu_state *st, unsigned n) {
  if (n <= st->n_fibers) return true;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t bytes = page + (size_t)CM_EMU_STACK_BYTES * (n - st->n_fibers);
  char *map = (char *)mmap(0, bytes, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (map == MAP_FAILED) return false;
  mprotect(map, page, PROT_NONE); /* below the lowest stack: an overflow there faults */
  st->stack_maps[st->n_stack_maps] = map;
  st->stack_map_bytes[st->n_stack_maps++] = bytes;
  for (unsigned i = st->n_fibers; i < n; i++) {
    cm_emu_fiber *f = &st->fibers[i];
    f->stack_lo = map + page + (size_t)(i - st->n_fibers) * CM_EMU_STACK_BYTES;
    f->stack_bytes = CM_EMU_STACK_BYTES;
    cm_emu_fiber_reset(f);
  }
  st->n_fibers = n;
  return true;
}

/* Whether fibers [0, n) kept their stacks' canaries (an overflow writes there first). */
static bool cm_emu_canaries_intact(const cm_emu_state *st, unsigned n) {
  for (unsigned i = 0; i < n; i++)
    for (int w = 0; w < CM_EMU_CANARY_WORDS; w++)
      if (((const uint64_t *)st->fibers[i].stack_lo)[w] != CM_EMU_CANARY) return false;
  return true;
}

/* Runs one block to its end; false on a deadlock (threads waiting on a barrier
 * no live thread can reach), whose fibers are reset. */
static bool cm_emu_run_block(cm_emu_state *st, unsigned n) {
  st->block_live = n;
  st->block_arrived = 0;
  for (unsigned w = 0; w < (n + 31) / 32; w++) {
    st->warp_live[w] = n - w * 32 < 32 ? n - w * 32 : 32;
    st->warp_arrived[w] = 0;
  }
  for (unsigned i = 0; i < n; i++) st->fibers[i].state = CM_EMU_READY;
  for (;;) {
    bool progressed = false, waiting = false;
    for (unsigned i = 0; i < n; i++) {
      cm_emu_fiber *f = &st->fibers[i];
      if (f->state == CM_EMU_DONE) continue;
      if ((f->state == CM_EMU_WAIT_BLOCK && f->wait_gen == st->block_gen) ||
          (f->state == CM_EMU_WAIT_WARP && f->wait_gen == st->warp_gen[f->warp])) {
        waiting = true;
        continue;
      }
      f->state = CM_EMU_READY;
      cm_emu_resume(st, f);
      progressed = true;
      if (f->state != CM_EMU_DONE) waiting = true;
    }
    if (!waiting) return true;
    if (!progressed) {
      for (unsigned i = 0; i < n; i++)
        if (st->fibers[i].state != CM_EMU_DONE) cm_emu_fiber_reset(&st->fibers[i]);
      return false;
    }
  }
}

/* After a launch the stacks' pages go back to the kernel (lazily, MADV_FREE:
 * reclaimed only under memory pressure): each module keeps fibers of its own per
 * OS thread, and a program has hundreds of modules. A released fiber starts
 * afresh (cm_emu_fiber_reset) when a launch next needs it. */
static void cm_emu_release_stacks(cm_emu_state *st) {
  for (int m = 0; m < st->n_stack_maps; m++)
    madvise(st->stack_maps[m], st->stack_map_bytes[m], MADV_FREE);
  for (unsigned i = 0; i < st->n_fibers; i++) st->fibers[i].released = true;
}

#define CM_EMU_EXPORT extern "C" __attribute__((visibility("default")))

CM_EMU_EXPORT int cm_emu_params(const char *name) {
  const cm_emu_entry *e = cm_emu_find(name);
  return e ? e->n_params : -1;
}

/* CUresult: 0; 1 (CUDA_ERROR_INVALID_VALUE): a bad extent; 2 (OUT_OF_MEMORY);
 * 500 (NOT_FOUND): no such function; 719 (LAUNCH_FAILED): a deadlock, or a
 * thread that overflowed its stack (CM_EMU_STACK_BYTES). */
static int cm_emu_launch_locked(const cm_emu_entry *e, const unsigned grid[3],
                                const unsigned block[3], unsigned shared_bytes, void **params);
CM_EMU_EXPORT int cm_emu_launch(const char *name, const unsigned grid[3], const unsigned block[3],
                                unsigned shared_bytes, void **params) {
  const cm_emu_entry *e = cm_emu_find(name);
  if (!e) return 500;
  unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
  if (!grid[0] || !grid[1] || !grid[2] || !threads || threads > CM_EMU_MAX_THREADS ||
      block[2] > 64 || grid[1] > 65535 || grid[2] > 65535)
    return 1;
  pthread_mutex_lock(&cm_emu_launch_mu);
  int rc = cm_emu_launch_locked(e, grid, block, shared_bytes, params);
  pthread_mutex_unlock(&cm_emu_launch_mu);
  return rc;
}

static int cm_emu_launch_locked(const cm_emu_entry *e, const unsigned grid[3],
                                const unsigned block[3], unsigned shared_bytes, void **params) {
  unsigned n = block[0] * block[1] * block[2];
  cm_emu_state *st = cm_emu_module_state();
  if (!st || !cm_emu_grow(st, n)) return 2;
  st->fault = 0;
  for (unsigned i = 0; st->async && i < n; i++) /* what a failed launch left in flight */
    st->async[i].n = st->async[i].committed = 0;
  if (shared_bytes > st->dynamic_shared_bytes) {
    free(st->dynamic_shared);
    st->dynamic_shared = (unsigned char *)aligned_alloc(16, (shared_bytes + 15) / 16 * 16);
    st->dynamic_shared_bytes = st->dynamic_shared ? shared_bytes : 0;
    if (!st->dynamic_shared) return 2;
  }
  for (unsigned i = 0; i < n; i++) {
    cm_emu_fiber *f = &st->fibers[i];
    if (f->released) cm_emu_fiber_reset(f);
    f->released = false;
    f->tid = i;
    f->warp = i / 32;
    f->lane = i % 32;
    f->idx = {i % block[0], i / block[0] % block[1], i / (block[0] * block[1])};
  }
  st->entry = e;
  st->params = params;
  blockDim = dim3(block[0], block[1], block[2]);
  gridDim = dim3(grid[0], grid[1], grid[2]);
  int rc = 0;
  for (unsigned z = 0; z < grid[2] && !rc; z++)
    for (unsigned y = 0; y < grid[1] && !rc; y++)
      for (unsigned x = 0; x < grid[0] && !rc; x++) {
        blockIdx = {x, y, z};
        if (!cm_emu_run_block(st, n) || !cm_emu_canaries_intact(st, n)) rc = 719;
        if (!rc && st->fault) rc = st->fault;
      }
  cm_emu_release_stacks(st);
  return rc;
}

__attribute__((destructor)) static void cm_emu_unload() {
  cm_emu_state *st = cm_emu_st;
  if (!st) return;
  for (int m = 0; m < st->n_stack_maps; m++) munmap(st->stack_maps[m], st->stack_map_bytes[m]);
  free(st->dynamic_shared);
  free(st->async);
  free(st);
  cm_emu_st = 0;
}

#endif
