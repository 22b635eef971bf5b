/* bench/peak: this CPU's FP32 FMA peak in GFLOP/s.
 *
 * For each vector width the CPU supports (AVX-512: 16 floats per zmm FMA, AVX2+FMA: 8 floats per
 * ymm FMA) every thread runs PEAK_CHAINS independent accumulator chains acc = acc * m + a, enough
 * to cover FMA latency x throughput, for a fixed wall time after a short warm-up, once on one
 * thread and once on all CPUs (an OpenMP parallel loop, one chain set per thread). One FMA is
 * 2 FLOP per lane. The best figure is printed last as `peak_fp32_gflops=<number>`; other
 * benchmarks report their GFLOP/s as a fraction of it.
 *
 * Usage: peak [--json] [--seconds S] [--threads N]
 *
 * Builds with any x86-64 target: the kernels carry their own target attributes and run only after
 * __builtin_cpu_supports says the CPU has the instructions. Build with bench/build.sh.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define PEAK_X86 1
#else
#define PEAK_X86 0
#endif

#ifndef PEAK_CHAINS
#define PEAK_CHAINS 12 /* independent chains per thread; must fit the register file with 2 more */
#endif
#if PEAK_CHAINS < 1 || PEAK_CHAINS > 28
#error "PEAK_CHAINS must be in 1..28"
#endif

/* Iterations between two clock reads: PEAK_CHAINS * 4096 FMAs, some tens of microseconds. */
#define PEAK_BLOCK 4096L
#define PEAK_WARMUP_S 0.1
#define PEAK_MAX_THREADS 1024

typedef struct {
  double t0, t1; /* measured interval (CLOCK_MONOTONIC seconds) */
  double cpu;    /* CPU time this thread got in [t0, t1] (CLOCK_THREAD_CPUTIME_ID seconds) */
  double fmas;   /* vector FMAs issued in [t0, t1] */
  float sum;     /* sum of the accumulators, keeps the chains alive */
  pthread_t tid; /* thread that ran this slot */
} peak_run;

typedef void (*peak_kernel)(double secs, float mul, float add, peak_run *out);

typedef struct {
  const char *isa;
  int lanes;
  peak_kernel kernel;
} peak_width;

typedef struct {
  const char *isa;
  int lanes, threads;
  double gflops, secs;
  double share; /* CPU time the threads got / (threads * wall time) */
  double oncpu; /* GFLOP/s per CPU-second of each thread, times threads */
} peak_result;

static volatile float peak_sink;         /* the chains' results end here */
static volatile float peak_mul = 0.999f; /* volatile: opaque to constant folding */
static volatile float peak_add = 0.001f;

static double clock_s(clockid_t id) {
  struct timespec ts;
  clock_gettime(id, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
static double now_s(void) {
  return clock_s(CLOCK_MONOTONIC);
}
static double cpu_s(void) {
  return clock_s(CLOCK_THREAD_CPUTIME_ID);
}

#if PEAK_X86
/* One kernel per width. acc converges to add / (1 - mul) = 1: no overflow, no denormals. The
 * inner loop is fully unrolled so that the accumulators live in registers; the first PEAK_WARMUP_S
 * seconds (frequency ramp-up) are not counted. */
#define PEAK_DEFINE_KERNEL(NAME, TARGET, VEC, LANES, SET1, FMADD, STOREU)                          \
  __attribute__((target(TARGET))) static void NAME(double secs, float mul, float add,              \
                                                   peak_run *out) {                                \
    VEC acc[PEAK_CHAINS];                                                                          \
    const VEC m = SET1(mul), a = SET1(add);                                                        \
    for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = SET1(0.01f * (float)c);                         \
    double start = now_s(), t = start, t0 = start, c0 = 0;                                         \
    double blocks = 0;                                                                             \
    int measuring = 0;                                                                             \
    for (;;) {                                                                                     \
      for (long i = 0; i < PEAK_BLOCK; i++) {                                                      \
        _Pragma("GCC unroll 32") for (int c = 0; c < PEAK_CHAINS; c++) acc[c] =                    \
            FMADD(acc[c], m, a);                                                                   \
      }                                                                                            \
      t = now_s();                                                                                 \
      if (measuring) {                                                                             \
        blocks += 1;                                                                               \
        if (t - t0 >= secs) break;                                                                 \
      } else if (t - start >= PEAK_WARMUP_S) {                                                     \
        measuring = 1;                                                                             \
        t0 = t;                                                                                    \
        c0 = cpu_s();                                                                              \
      }                                                                                            \
    }                                                                                              \
    float buf[LANES], sum = 0;                                                                     \
    for (int c = 0; c < PEAK_CHAINS; c++) {                                                        \
      STOREU(buf, acc[c]);                                                                         \
      for (int l = 0; l < LANES; l++) sum += buf[l];                                               \
    }                                                                                              \
    out->t0 = t0;                                                                                  \
    out->t1 = t;                                                                                   \
    out->cpu = cpu_s() - c0;                                                                       \
    out->fmas = blocks * (double)PEAK_BLOCK * PEAK_CHAINS;                                         \
    out->sum = sum;                                                                                \
  }

PEAK_DEFINE_KERNEL(peak_avx512, "avx512f", __m512, 16, _mm512_set1_ps, _mm512_fmadd_ps,
                   _mm512_storeu_ps)
PEAK_DEFINE_KERNEL(peak_avx2, "avx2,fma", __m256, 8, _mm256_set1_ps, _mm256_fmadd_ps,
                   _mm256_storeu_ps)

static int peak_widths(peak_width *w) {
  int n = 0;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) w[n++] = (peak_width){"avx512", 16, peak_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    w[n++] = (peak_width){"avx2", 8, peak_avx2};
  return n;
}
#else
static int peak_widths(peak_width *w) {
  (void)w;
  return 0;
}
#endif

/* Runs `w`'s kernel on `threads` threads at once (one OpenMP loop iteration per thread). GFLOP/s
 * are taken over the union of the measured intervals: total FLOP / (last end - first start). If
 * OpenMP gives fewer threads (or the program is built without OpenMP), iterations run one after
 * another, the union grows and the figure stays honest; the result names the number of distinct
 * threads that ran. */
static peak_result peak_measure(const peak_width *w, int threads, double secs) {
  peak_run *runs = calloc((size_t)threads, sizeof *runs);
  if (!runs) {
    fprintf(stderr, "peak: out of memory for %d threads\n", threads);
    exit(1);
  }
  const float mul = peak_mul, add = peak_add;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1)
#endif
  for (int i = 0; i < threads; i++) {
    w->kernel(secs, mul, add, &runs[i]);
    runs[i].tid = pthread_self();
  }
  double t0 = runs[0].t0, t1 = runs[0].t1, fmas = 0, cpu = 0;
  float sum = 0;
  int distinct = 0;
  for (int i = 0; i < threads; i++) {
    if (runs[i].t0 < t0) t0 = runs[i].t0;
    if (runs[i].t1 > t1) t1 = runs[i].t1;
    fmas += runs[i].fmas;
    cpu += runs[i].cpu;
    sum += runs[i].sum;
    int seen = 0;
    for (int j = 0; j < i && !seen; j++) seen = pthread_equal(runs[i].tid, runs[j].tid);
    distinct += !seen;
  }
  peak_sink = sum;
  free(runs);
  const double gflop = fmas * w->lanes * 2.0 / 1e9;
  peak_result r = {w->isa,
                   w->lanes,
                   distinct,
                   gflop / (t1 - t0),
                   t1 - t0,
                   cpu / (distinct * (t1 - t0)),
                   cpu > 0 ? gflop / cpu * distinct : 0};
  return r;
}

static void usage(FILE *f) {
  fprintf(f, "usage: peak [--json] [--seconds S] [--threads N]\n"
             "  measures the FP32 FMA peak (GFLOP/s) per vector width on 1 thread and on N\n"
             "  threads (default: all online CPUs); S seconds per configuration (default 0.5)\n");
}

int main(int argc, char **argv) {
  int json = 0, threads = 0;
  double secs = 0.5;
  for (int i = 1; i < argc; i++) {
    char *end = NULL;
    if (!strcmp(argv[i], "--json")) {
      json = 1;
    } else if (!strcmp(argv[i], "--seconds") && i + 1 < argc) {
      secs = strtod(argv[++i], &end);
      if (*end || !(secs >= 0.01 && secs <= 600)) {
        fprintf(stderr, "peak: --seconds takes a number in [0.01, 600], got '%s'\n", argv[i]);
        return 2;
      }
    } else if (!strcmp(argv[i], "--threads") && i + 1 < argc) {
      long n = strtol(argv[++i], &end, 10);
      if (*end || n < 1 || n > PEAK_MAX_THREADS) {
        fprintf(stderr, "peak: --threads takes an integer in [1, %d], got '%s'\n", PEAK_MAX_THREADS,
                argv[i]);
        return 2;
      }
      threads = (int)n;
    } else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
      usage(stdout);
      return 0;
    } else {
      fprintf(stderr, "peak: unknown or incomplete argument '%s'\n", argv[i]);
      usage(stderr);
      return 2;
    }
  }
  if (!threads) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    threads = n < 1 ? 1 : n > PEAK_MAX_THREADS ? PEAK_MAX_THREADS : (int)n;
  }

  peak_width widths[2];
  int nw = peak_widths(widths);
  if (!nw) {
    fprintf(stderr, "peak: this CPU has neither AVX-512F nor AVX2+FMA; nothing to measure\n");
    return 1;
  }

  peak_result res[4];
  int nr = 0;
  for (int k = 0; k < nw; k++) {
    int counts[2] = {1, threads};
    for (int c = 0; c < (threads > 1 ? 2 : 1); c++) {
      res[nr++] = peak_measure(&widths[k], counts[c], secs);
    }
  }
  double best = 0, best1 = 0, best_oncpu = 0, min_share = 1;
  for (int i = 0; i < nr; i++) {
    if (res[i].gflops > best) best = res[i].gflops;
    if (res[i].threads == 1 && res[i].gflops > best1) best1 = res[i].gflops;
    if (res[i].oncpu > best_oncpu) best_oncpu = res[i].oncpu;
    if (res[i].share < min_share) min_share = res[i].share;
  }
  if (min_share < 0.9)
    fprintf(stderr,
            "peak: warning: the measuring threads got only %.0f%% of their CPUs (the machine is "
            "busy); GFLOP/s are low, the on-CPU figures estimate an idle machine\n",
            100 * min_share);

  if (json) {
    printf("{\"chains\": %d, \"seconds\": %g, \"results\": [", PEAK_CHAINS, secs);
    for (int i = 0; i < nr; i++)
      printf("%s{\"isa\": \"%s\", \"lanes\": %d, \"threads\": %d, \"gflops\": %.1f, "
             "\"seconds\": %.3f, \"cpu_share\": %.3f, \"oncpu_gflops\": %.1f}",
             i ? ", " : "", res[i].isa, res[i].lanes, res[i].threads, res[i].gflops, res[i].secs,
             res[i].share, res[i].oncpu);
    printf("], \"peak_fp32_gflops_1thread\": %.1f, \"peak_fp32_gflops_oncpu\": %.1f, "
           "\"peak_fp32_gflops\": %.1f}\n",
           best1, best_oncpu, best);
    return 0;
  }
  printf("FP32 FMA peak, %d independent chains per thread, %.2f s per row\n", PEAK_CHAINS, secs);
  printf("%-8s %5s %7s %10s %11s %5s %15s\n", "isa", "lanes", "threads", "GFLOP/s", "per thread",
         "cpu%", "on-CPU GFLOP/s");
  for (int i = 0; i < nr; i++)
    printf("%-8s %5d %7d %10.1f %11.1f %5.0f %15.1f\n", res[i].isa, res[i].lanes, res[i].threads,
           res[i].gflops, res[i].gflops / res[i].threads, 100 * res[i].share, res[i].oncpu);
  printf("peak_fp32_gflops_1thread=%.1f\n", best1);
  printf("peak_fp32_gflops_oncpu=%.1f\n", best_oncpu);
  printf("peak_fp32_gflops=%.1f\n", best);
  return 0;
}
