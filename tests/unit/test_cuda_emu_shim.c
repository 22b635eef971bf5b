/* tests/unit/test_cuda_emu_shim.c — the emulated CUDA device's module half
 * (tests/emu/cuda_shim.hpp, tests/emu/emu_compiler.c) tested directly: CUDA C
 * compiled through emu_compiler(), the image's shared object loaded here and
 * its kernels run through cm_emu_launch. Indexing, barriers, shared memory
 * (static and dynamic), warp shuffles and votes, atomics under contention (two
 * OS threads launching at once), the prelude's f16 conversions and tensor-core
 * mma helper against scalar references, the launch limits, deadlocks, and real
 * rendered GEMMs (f32 FMA and bf16 mma) against a naive product.
 * test_tiny_variants (long) compiles every distinct kernel of both tiny
 * variants' training steps under the shim. */
#define _GNU_SOURCE
#include "../test.h"
#include "../testlib.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <dlfcn.h>
#include <pthread.h>
#include <sys/wait.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* this thread's CPU time: the machine is shared, wall time says little */
static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- building and loading modules ------------------------------------------ */

typedef struct emu_mod {
  void *handle;
  emu_module_params_fn params;
  emu_module_launch_fn launch;
  cm_cubin image;
} emu_mod;

/* Loads a module image (header checked) through a temporary file. */
static bool mod_load(const cm_cubin *image, emu_mod *m) {
  emu_image_header h;
  CHECK(image->size > sizeof h);
  if (image->size <= sizeof h) return false;
  memcpy(&h, image->data, sizeof h);
  CHECK(!memcmp(h.magic, EMU_IMAGE_MAGIC, sizeof h.magic));
  CHECK(h.so_bytes == image->size - sizeof h);
  char path[] = "/tmp/cmaec_emu_test_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  if (fd < 0) return false;
  bool wrote = write(fd, (char *)image->data + sizeof h, h.so_bytes) == (ssize_t)h.so_bytes;
  close(fd);
  CHECK(wrote);
  m->handle = wrote ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  CHECK_MSG(m->handle != NULL, "%s", wrote ? dlerror() : "not written");
  unlink(path);
  if (!m->handle) return false;
  void *p = dlsym(m->handle, EMU_MODULE_PARAMS_SYMBOL),
       *l = dlsym(m->handle, EMU_MODULE_LAUNCH_SYMBOL);
  CHECK(p && l);
  memcpy(&m->params, &p, sizeof p);
  memcpy(&m->launch, &l, sizeof l);
  return p && l;
}

/* Compiles src through emu_compiler() and loads the image's shared object. */
static bool mod_build(const char *src, emu_mod *m) {
  memset(m, 0, sizeof *m);
  const cm_cuda_compiler *c = emu_compiler();
  cm_err err = {0};
  cm_status st = c->compile(c->self, src, "test_module", "sm_90", &m->image, &err);
  CHECK_MSG(st == CM_OK, "%s\n%.4000s", err.msg, m->image.log ? m->image.log : "");
  return st == CM_OK && mod_load(&m->image, m);
}

static void mod_free(emu_mod *m) {
  if (m->handle) dlclose(m->handle);
  cm_cubin_free(&m->image);
  memset(m, 0, sizeof *m);
}

static int mod_run(const emu_mod *m, const char *name, unsigned gx, unsigned gy, unsigned gz,
                   unsigned bx, unsigned by, unsigned bz, unsigned shared, void **args) {
  unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
  return m->launch(name, grid, block, shared, args);
}

/* The renderer's prelude (sm_90: with the mma helper), for kernels that use it. */
static char *prelude(void) {
  cm_kernel empty;
  cm_kernel_init(&empty, "none");
  cm_target t;
  cm_err err = {0};
  char *pre = NULL;
  CHECK(cm_target_cuda("sm_90", &t, &err) == CM_OK);
  cm_cuda_render_opts ro = {&t, false};
  CHECK_MSG(cm_render_cuda(&empty, &ro, true, &pre, &err) == CM_OK, "%s", err.msg);
  cm_kernel_free(&empty);
  return pre;
}

static char *concat(const char *a, const char *b) {
  size_t na = strlen(a), nb = strlen(b);
  char *s = malloc(na + nb + 1);
  if (!s) return NULL;
  memcpy(s, a, na);
  memcpy(s + na, b, nb + 1);
  return s;
}

/* ---- hand-written kernels ------------------------------------------------------ */

static const char *const K_BASIC =
    "extern \"C\" __global__ void index3d(unsigned *out) {\n"
    "  unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);\n"
    "  unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);\n"
    "  unsigned *o = out + 8 * (b * blockDim.x * blockDim.y * blockDim.z + t);\n"
    "  o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;\n"
    "  o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;\n"
    "  o[6] = blockDim.x * 10000 + blockDim.y * 100 + blockDim.z;\n"
    "  o[7] = gridDim.x * 10000 + gridDim.y * 100 + gridDim.z;\n"
    "}\n"
    "// a block's tree sum; threads past n return first (they count as arrived)\n"
    "extern \"C\" __global__ void __launch_bounds__(256, 2) block_sum(const int *in, int *out,\n"
    "                                                                  const int *n) {\n"
    "  __shared__ int s[256];\n"
    "  s[threadIdx.x] = 0;\n"
    "  if ((int)threadIdx.x >= *n) return;\n"
    "  s[threadIdx.x] = in[blockIdx.x * 256 + threadIdx.x];\n"
    "  __syncthreads();\n"
    "  for (int o = 128; o > 0; o >>= 1) {\n"
    "    if ((int)threadIdx.x < o && (int)threadIdx.x + o < *n) s[threadIdx.x] += "
    "s[threadIdx.x + o];\n"
    "    __syncthreads();\n"
    "  }\n"
    "  if (threadIdx.x == 0) out[blockIdx.x] = s[0];\n"
    "}\n"
    "extern \"C\" __global__ void transpose(const float *__restrict__ in, float *out, const int "
    "*dims) {\n"
    "  __shared__ __align__(16) float tile[32][33];\n"
    "  const int rows = dims[0], cols = dims[1];\n"
    "  int x = blockIdx.x * 32 + threadIdx.x, y = blockIdx.y * 32 + threadIdx.y;\n"
    "  for (int j = 0; j < 32; j += blockDim.y)\n"
    "    if (x < cols && y + j < rows) tile[threadIdx.y + j][threadIdx.x] = in[(y + j) * cols + "
    "x];\n"
    "  __syncthreads();\n"
    "  x = blockIdx.y * 32 + threadIdx.x;\n"
    "  y = blockIdx.x * 32 + threadIdx.y;\n"
    "  for (int j = 0; j < 32; j += blockDim.y)\n"
    "    if (x < rows && y + j < cols) out[(y + j) * rows + x] = tile[threadIdx.x][threadIdx.y + "
    "j];\n"
    "}\n"
    "extern \"C\" __global__ void dyn_reverse(const float *in, float *out) {\n"
    "  // a comment naming extern __shared__ is left as it is\n"
    "  extern __shared__ float dyn[];\n"
    "  const unsigned n = blockDim.x, t = threadIdx.x;\n"
    "  dyn[t] = in[blockIdx.x * n + t];\n"
    "  __syncthreads();\n"
    "  out[blockIdx.x * n + t] = dyn[n - 1 - t];\n"
    "}\n"
    "extern \"C\" __global__ void dyn_bytes(int *out) {\n"
    "  extern __shared__ __align__(16) unsigned char raw[];\n"
    "  ((int *)raw)[threadIdx.x] = (int)threadIdx.x * 3;\n"
    "  __syncthreads();\n"
    "  out[threadIdx.x] = ((int *)raw)[(threadIdx.x + 1) % blockDim.x];\n"
    "}\n"
    "extern \"C\" __global__ void stuck(int *out) {\n"
    "  if (threadIdx.x < 16) __syncthreads();\n"
    "  else __syncwarp();\n"
    "  out[threadIdx.x] = 1;\n"
    "}\n"
    "// thread 1 needs more stack than a fiber has (thread 0, the lowest stack, is done)\n"
    "__device__ __noinline__ int deep_frame() {\n"
    "  volatile char big[160 << 10];\n"
    "  for (int i = 0; i < (160 << 10); i++) big[i] = (char)i;\n"
    "  return big[12345];\n"
    "}\n"
    "extern \"C\" __global__ void deep(int *out) {\n"
    "  if (threadIdx.x == 1) out[0] = deep_frame();\n"
    "}\n"
    "extern \"C\" __global__ void barrier_loop(int *out, const int *iters) {\n"
    "  int v = threadIdx.x;\n"
    "  for (int i = 0; i < *iters; i++) {\n"
    "    v += i;\n"
    "    __syncthreads();\n"
    "  }\n"
    "  out[blockIdx.x * blockDim.x + threadIdx.x] = v;\n"
    "}\n";

static const char *const K_WARP =
    "extern \"C\" __global__ void shuffles(const int *in, int *out) {\n"
    "  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;\n"
    "  const int v = in[gid];\n"
    "  int *o = out + 6 * gid;\n"
    "  o[0] = __shfl_sync(0xffffffffu, v, (lane * 7 + 3) % 32);\n"
    "  o[1] = __shfl_up_sync(0xffffffffu, v, 3);\n"
    "  o[2] = __shfl_down_sync(0xffffffffu, v, 5);\n"
    "  o[3] = __shfl_xor_sync(0xffffffffu, v, 9);\n"
    "  o[4] = __shfl_sync(0xffffffffu, v, 2, 8);\n"
    "  o[5] = __shfl_down_sync(0xffffffffu, v, 2, 16);\n"
    "}\n"
    "// every lane gets its warp's sum (doubles, butterfly) and its float prefix sum\n"
    "extern \"C\" __global__ void warp_sums(const float *in, double *sum, float *prefix) {\n"
    "  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;\n"
    "  double s = in[gid];\n"
    "  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);\n"
    "  sum[gid] = s;\n"
    "  float p = in[gid];\n"
    "  for (unsigned o = 1; o < 32; o <<= 1) {\n"
    "    float u = __shfl_up_sync(0xffffffffu, p, o);\n"
    "    if (lane >= o) p += u;\n"
    "  }\n"
    "  prefix[gid] = p;\n"
    "}\n"
    "extern \"C\" __global__ void votes(const int *pred, unsigned *out) {\n"
    "  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  const int p = pred[gid];\n"
    "  out[3 * gid] = __ballot_sync(0xffffffffu, p);\n"
    "  out[3 * gid + 1] = __any_sync(0xffffffffu, p);\n"
    "  out[3 * gid + 2] = __all_sync(0xffffffffu, p);\n"
    "}\n";

static const char *const K_ATOMICS =
    "extern \"C\" __global__ void atomics(float *f, double *d, int *i, unsigned long long *u,\n"
    "                                    int *mx, unsigned *counter) {\n"
    "  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  atomicAdd(f, 1.0f);\n"
    "  atomicAdd(d, 0.25);\n"
    "  atomicAdd(i, (int)(gid % 7));\n"
    "  atomicAdd(u, (unsigned long long)gid);\n"
    "  atomicMax(mx, (int)((gid * 7919u) % 100003u));\n"
    "  unsigned old = *counter, assumed;\n"
    "  __syncthreads(); // every thread of the block read the same value: they contend\n"
    "  do {\n"
    "    assumed = old;\n"
    "    old = atomicCAS(counter, assumed, assumed + 1);\n"
    "  } while (old != assumed);\n"
    "}\n";

/* ---- indexing, barriers, shared memory -------------------------------------------- */

static void test_indexing_3d(void) {
  /* the name (in the cache key): the compiler's version, the flags, the shim's hash */
  const cm_cuda_compiler *c = emu_compiler();
  CHECK(c == emu_compiler() && !strcmp(c->image_suffix, "so"));
  CHECK(!strncmp(c->name, "emulated ", 9) && strlen(c->name) > 40);
  CHECK_STR_CONTAINS(c->name, " -std=c++17 -O1 ");
  CHECK_STR_CONTAINS(c->name, " -DCMAEC_EMULATED");
  CHECK_STR_CONTAINS(c->name, " shim ");
  emu_mod m;
  if (!mod_build(K_BASIC, &m)) return;
  CHECK(m.params("index3d") == 1 && m.params("block_sum") == 3 && m.params("transpose") == 3);
  CHECK(m.params("nope") == -1);
  CHECK(m.image.n_kernels == 8 && !strcmp(m.image.kernels[0].name, "index3d") &&
        !strcmp(m.image.kernels[5].name, "stuck") && m.image.kernels[1].registers == -1);
  const unsigned g[3] = {3, 2, 2}, b[3] = {4, 3, 2};
  unsigned nb = g[0] * g[1] * g[2], nt = b[0] * b[1] * b[2];
  unsigned *out = calloc((size_t)nb * nt * 8, sizeof *out);
  void *args[] = {&out};
  CHECK(mod_run(&m, "index3d", g[0], g[1], g[2], b[0], b[1], b[2], 0, args) == 0);
  int bad = 0;
  for (unsigned bz = 0; bz < g[2]; bz++)
    for (unsigned by = 0; by < g[1]; by++)
      for (unsigned bx = 0; bx < g[0]; bx++)
        for (unsigned tz = 0; tz < b[2]; tz++)
          for (unsigned ty = 0; ty < b[1]; ty++)
            for (unsigned tx = 0; tx < b[0]; tx++) {
              unsigned blk = bx + g[0] * (by + g[1] * bz), t = tx + b[0] * (ty + b[1] * tz);
              const unsigned *o = out + 8 * (blk * nt + t);
              unsigned want[8] = {tx, ty, tz, bx, by, bz, 40302, 30202};
              bad += memcmp(o, want, sizeof want) != 0;
            }
  CHECK_MSG(bad == 0, "%d of %u threads saw wrong indices", bad, nb * nt);
  free(out);
  mod_free(&m);
}

static void test_barriers_and_shared(void) {
  emu_mod m;
  if (!mod_build(K_BASIC, &m)) return;
  test_rng rng = {11};
  /* block sums, whole blocks and blocks where threads past n return at once */
  enum { BLOCKS = 7 };
  int *in = malloc(BLOCKS * 256 * sizeof *in), out[BLOCKS];
  for (int i = 0; i < BLOCKS * 256; i++) in[i] = (int)test_int(&rng, -1000, 1000);
  static const int ns[] = {256, 100, 1};
  for (int c = 0; c < 3; c++) {
    int n = ns[c];
    void *args[] = {&in, &(int *){out}, &(const int *){&n}};
    CHECK(mod_run(&m, "block_sum", BLOCKS, 1, 1, 256, 1, 1, 0, args) == 0);
    for (int bl = 0; bl < BLOCKS; bl++) {
      int want = 0;
      for (int t = 0; t < n; t++) want += in[bl * 256 + t];
      CHECK_MSG(out[bl] == want, "n %d block %d: %d, want %d", n, bl, out[bl], want);
    }
  }
  /* a transposed tile through shared memory (blocks 32 x 8, partial tiles at the edges) */
  int dims[2] = {70, 45};
  int rows = dims[0], cols = dims[1];
  float *a = malloc((size_t)rows * cols * sizeof *a), *t = calloc((size_t)rows * cols, sizeof *t);
  for (int i = 0; i < rows * cols; i++) a[i] = (float)test_uniform_in(&rng, -1, 1);
  void *targs[] = {&a, &t, &(const int *){dims}};
  CHECK(mod_run(&m, "transpose", (cols + 31) / 32, (rows + 31) / 32, 1, 32, 8, 1, 0, targs) == 0);
  int bad = 0;
  for (int r = 0; r < rows; r++)
    for (int c = 0; c < cols; c++) bad += t[c * rows + r] != a[r * cols + c];
  CHECK_MSG(bad == 0, "%d of %d transposed elements wrong", bad, rows * cols);
  /* dynamic shared memory: as floats, and as bytes of another declaration */
  enum { N = 96 };
  float din[3 * N], dout[3 * N];
  for (int i = 0; i < 3 * N; i++) din[i] = (float)i;
  void *dargs[] = {&(const float *){din}, &(float *){dout}};
  CHECK(mod_run(&m, "dyn_reverse", 3, 1, 1, N, 1, 1, N * sizeof(float), dargs) == 0);
  bad = 0;
  for (int bl = 0; bl < 3; bl++)
    for (int i = 0; i < N; i++) bad += dout[bl * N + i] != din[bl * N + N - 1 - i];
  CHECK(bad == 0);
  int iout[40];
  void *bargs[] = {&(int *){iout}};
  CHECK(mod_run(&m, "dyn_bytes", 1, 1, 1, 40, 1, 1, 40 * sizeof(int), bargs) == 0);
  for (int i = 0; i < 40; i++) CHECK(iout[i] == (i + 1) % 40 * 3);
  free(in);
  free(a);
  free(t);
  mod_free(&m);
}

static void test_launch_limits_and_deadlock(void) {
  emu_mod m;
  if (!mod_build(K_BASIC, &m)) return;
  unsigned *out = calloc(2048 * 8, sizeof *out);
  void *args[] = {&out};
  CHECK(mod_run(&m, "index3d", 1, 1, 1, 1025, 1, 1, 0, args) == 1);
  CHECK(mod_run(&m, "index3d", 1, 1, 1, 32, 16, 3, 0, args) == 1);
  CHECK(mod_run(&m, "index3d", 1, 1, 1, 1, 1, 65, 0, args) == 1);
  CHECK(mod_run(&m, "index3d", 0, 1, 1, 32, 1, 1, 0, args) == 1);
  CHECK(mod_run(&m, "index3d", 1, 1, 1, 32, 0, 1, 0, args) == 1);
  CHECK(mod_run(&m, "no_such_kernel", 1, 1, 1, 32, 1, 1, 0, args) == 500);
  /* 1024 threads is the most a block has */
  CHECK(mod_run(&m, "index3d", 2, 1, 1, 1024, 1, 1, 0, args) == 0);
  CHECK(out[8 * 2047] == 1023 && out[8 * 2047 + 3] == 1);
  /* half a warp at __syncthreads, half at __syncwarp: no thread can go on */
  int flags[32] = {0};
  void *sargs[] = {&(int *){flags}};
  CHECK(mod_run(&m, "stuck", 2, 1, 1, 32, 1, 1, 0, sargs) == 719);
  int set = 0;
  for (int i = 0; i < 32; i++) set += flags[i];
  CHECK(set == 0);
  /* a thread past its stack: its canary tells */
  void *dargs[] = {&(int *){flags}};
  CHECK(mod_run(&m, "deep", 1, 1, 1, 2, 1, 1, 0, dargs) == 719);
  /* the stuck fibers and the overflowed stack were reset: the next launch runs */
  memset(out, 0, 2048 * 8 * sizeof *out);
  CHECK(mod_run(&m, "index3d", 1, 1, 1, 64, 1, 1, 0, args) == 0);
  CHECK(out[8 * 63] == 63 && out[8 * 63 + 6] == 640101);
  free(out);
  mod_free(&m);
}

/* What a thread costs: in a block without barriers (two switches: start, end),
 * and per __syncthreads (two switches: out, back in). */
static void test_switch_costs(void) {
  emu_mod m;
  if (!mod_build(K_BASIC, &m)) return;
  enum { BLOCKS = 64, THREADS = 256, ITERS = 200 };
  int *out = calloc(BLOCKS * THREADS, sizeof *out), iters = ITERS, zero = 0;
  void *args[] = {&out, &(const int *){&iters}}, *args0[] = {&out, &(const int *){&zero}};
  double best = 1e30, best0 = 1e30;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = cpu_s();
    CHECK(mod_run(&m, "barrier_loop", BLOCKS, 1, 1, THREADS, 1, 1, 0, args) == 0);
    double t1 = cpu_s();
    CHECK(mod_run(&m, "barrier_loop", BLOCKS, 1, 1, THREADS, 1, 1, 0, args0) == 0);
    best = fmin(best, t1 - t0);
    best0 = fmin(best0, cpu_s() - t1);
  }
  int bad = 0;
  for (int i = 0; i < BLOCKS * THREADS; i++) bad += out[i] != i % THREADS;
  CHECK(bad == 0);
  CHECK(mod_run(&m, "barrier_loop", BLOCKS, 1, 1, THREADS, 1, 1, 0, args) == 0);
  bad = 0;
  for (int i = 0; i < BLOCKS * THREADS; i++) bad += out[i] != i % THREADS + ITERS * (ITERS - 1) / 2;
  CHECK(bad == 0);
  double threads = (double)BLOCKS * THREADS;
  fprintf(stderr,
          "  CPU time: %.1f ns a thread without barriers, %.1f ns a thread's __syncthreads\n",
          best0 / threads * 1e9, (best - best0) / (threads * ITERS) * 1e9);
  free(out);
  mod_free(&m);
}

/* Under AddressSanitizer (CMAEC_SANITIZE) modules are instrumented too: a kernel
 * writing one past its allocation is reported (in a child process, whose report
 * the parent reads). Elsewhere the same kernel runs in bounds. */
#if defined(__SANITIZE_ADDRESS__)
#define EMU_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define EMU_TEST_ASAN 1
#endif
#endif
static void test_out_of_bounds(void) {
  emu_mod m;
  if (!mod_build("extern \"C\" __global__ void past_end(int *out, const int *n) {\n"
                 "  out[blockIdx.x * blockDim.x + threadIdx.x + *n] = 1;\n"
                 "}\n",
                 &m))
    return;
  int *out = calloc(64, sizeof *out);
#ifdef EMU_TEST_ASAN
  char log[] = "/tmp/cmaec_emu_asan_XXXXXX";
  int fd = mkstemp(log);
  CHECK(fd >= 0);
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    dup2(fd, 2);
    int one = 1; /* out[64]: one past the end */
    void *args[] = {&out, &(const int *){&one}};
    mod_run(&m, "past_end", 1, 1, 1, 64, 1, 1, 0, args);
    _exit(0);
  }
  int status = 0;
  CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
  CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) != 0, "the child exited with status %d",
            status);
  size_t size = 0;
  char *report = NULL;
  FILE *f = lseek(fd, 0, SEEK_SET) == 0 ? fdopen(fd, "r") : NULL;
  if (f) {
    report = calloc(1, 65536);
    size = report ? fread(report, 1, 65535, f) : 0;
    fclose(f);
  }
  CHECK(size > 0 && report && strstr(report, "heap-buffer-overflow") != NULL);
  free(report);
  unlink(log);
#else
  int zero = 0;
  void *args[] = {&out, &(const int *){&zero}};
  CHECK(mod_run(&m, "past_end", 1, 1, 1, 64, 1, 1, 0, args) == 0);
  for (int i = 0; i < 64; i++) CHECK(out[i] == 1);
#endif
  free(out);
  mod_free(&m);
}

/* ---- warp collectives ------------------------------------------------------------- */

static void test_shuffles(void) {
  emu_mod m;
  if (!mod_build(K_WARP, &m)) return;
  test_rng rng = {5};
  enum { T = 128 };
  int in[T], out[6 * T];
  for (int i = 0; i < T; i++) in[i] = (int)test_int(&rng, -100000, 100000);
  void *args[] = {&(const int *){in}, &(int *){out}};
  CHECK(mod_run(&m, "shuffles", 2, 1, 1, 64, 1, 1, 0, args) == 0);
  int bad = 0;
  for (int g = 0; g < T; g++) {
    int lane = g % 32, w = g - lane;
    int want[6] = {in[w + (lane * 7 + 3) % 32],       lane >= 3 ? in[g - 3] : in[g],
                   lane + 5 < 32 ? in[g + 5] : in[g], in[w + (lane ^ 9)],
                   in[w + (lane & ~7) + 2],           lane % 16 + 2 < 16 ? in[g + 2] : in[g]};
    for (int k = 0; k < 6; k++) {
      bad += out[6 * g + k] != want[k];
      if (out[6 * g + k] != want[k] && bad < 5)
        fprintf(stderr, "  thread %d shuffle %d: %d, want %d\n", g, k, out[6 * g + k], want[k]);
    }
  }
  CHECK(bad == 0);
  /* a butterfly sum of doubles and a float prefix sum, in a block of 3 warps */
  float f[96], prefix[96];
  double sum[96];
  for (int i = 0; i < 96; i++) f[i] = (float)test_int(&rng, -50, 50);
  void *wargs[] = {&(const float *){f}, &(double *){sum}, &(float *){prefix}};
  CHECK(mod_run(&m, "warp_sums", 1, 1, 1, 96, 1, 1, 0, wargs) == 0);
  for (int w = 0; w < 3; w++) {
    double s = 0;
    float p = 0;
    for (int l = 0; l < 32; l++) s += f[32 * w + l];
    for (int l = 0; l < 32; l++) {
      p += f[32 * w + l];
      CHECK(sum[32 * w + l] == s && prefix[32 * w + l] == p);
    }
  }
  mod_free(&m);
}

static void test_votes(void) {
  emu_mod m;
  if (!mod_build(K_WARP, &m)) return;
  test_rng rng = {7};
  enum { T = 128 };
  int pred[T];
  unsigned out[3 * T];
  /* warp 0 random, warp 1 all set, warp 2 none, warp 3 one lane */
  for (int i = 0; i < T; i++)
    pred[i] = i < 32 ? (int)(test_u32(&rng) & 1) : i < 64 ? 5 : i < 96 ? 0 : i == 113;
  void *args[] = {&(const int *){pred}, &(unsigned *){out}};
  CHECK(mod_run(&m, "votes", 1, 1, 1, T, 1, 1, 0, args) == 0);
  for (int w = 0; w < 4; w++) {
    unsigned bits = 0;
    for (int l = 0; l < 32; l++) bits |= (unsigned)(pred[32 * w + l] != 0) << l;
    for (int l = 0; l < 32; l++) {
      const unsigned *o = out + 3 * (32 * w + l);
      CHECK_MSG(o[0] == bits && o[1] == (bits != 0) && o[2] == (bits == 0xffffffffu),
                "warp %d lane %d: %08x %u %u, want %08x", w, l, o[0], o[1], o[2], bits);
    }
  }
  /* a partial last warp (40 threads): its 8 lanes are the whole warp */
  for (int i = 0; i < 40; i++) pred[i] = 1;
  CHECK(mod_run(&m, "votes", 1, 1, 1, 40, 1, 1, 0, args) == 0);
  CHECK(out[3 * 0] == 0xffffffffu && out[3 * 39] == 0xffu && out[3 * 39 + 2] == 1);
  mod_free(&m);
}

/* ---- atomics ------------------------------------------------------------------------ */

typedef struct atomics_run {
  const emu_mod *m;
  void **args;
  int rc;
} atomics_run;

static void *atomics_thread(void *p) {
  atomics_run *r = p;
  r->rc = mod_run(r->m, "atomics", 32, 1, 1, 256, 1, 1, 0, r->args);
  return NULL;
}

static void test_atomics(void) {
  emu_mod m;
  if (!mod_build(K_ATOMICS, &m)) return;
  float f = 0;
  double d = 0;
  int i = 0, mx = -1;
  unsigned long long u = 0;
  unsigned counter = 0;
  void *args[] = {&(float *){&f}, &(double *){&d},        &(int *){&i}, &(unsigned long long *){&u},
                  &(int *){&mx},  &(unsigned *){&counter}};
  /* two OS threads launch the same module at once (its launches take turns, on
   * the same statics): 2 x 32 blocks x 256 threads */
  atomics_run runs[2] = {{&m, args, -1}, {&m, args, -1}};
  pthread_t th[2];
  for (int k = 0; k < 2; k++) CHECK(pthread_create(&th[k], NULL, atomics_thread, &runs[k]) == 0);
  for (int k = 0; k < 2; k++) pthread_join(th[k], NULL);
  CHECK(runs[0].rc == 0 && runs[1].rc == 0);
  const unsigned n = 32 * 256;
  long long want_i = 0, want_mx = -1;
  unsigned long long want_u = 0;
  for (unsigned g = 0; g < n; g++) {
    want_i += g % 7;
    want_u += g;
    long long v = (long long)((g * 7919u) % 100003u);
    if (v > want_mx) want_mx = v;
  }
  CHECK(f == (float)(2 * n) && d == 0.25 * 2 * n);
  CHECK(i == 2 * want_i && u == 2 * want_u && mx == want_mx);
  CHECK_MSG(counter == 2 * n, "the CAS counter reached %u of %u", counter, 2 * n);
  mod_free(&m);
}

/* ---- the prelude's helpers: f16 conversions and the tensor-core mma ------------------ */

static const char *const K_PRELUDE_USERS =
    "extern \"C\" __global__ void f16_round(const float *in, unsigned short *h, float *back,\n"
    "                                      const int *n) {\n"
    "  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < *n; i += blockDim.x * gridDim.x) {\n"
    "    h[i] = cm_f2h(in[i]);\n"
    "    back[i] = cm_rh(in[i]);\n"
    "  }\n"
    "}\n"
    "extern \"C\" __global__ void h2f_all(float *out) {\n"
    "  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  out[i] = cm_h2f((cm_f16_t)i);\n"
    "}\n"
    "// one m16n8k16 tile per warp: A 16x16 row-major, B 16x8 (B[k * 8 + n]), C and D 16x8\n"
    "extern \"C\" __global__ void mma_tiles(const unsigned short *A, const unsigned short *B,\n"
    "                                      const float *C, float *D, const int *bf16) {\n"
    "  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, q = lane & "
    "3u;\n"
    "  A += w * 256;\n  B += w * 128;\n  C += w * 128;\n  D += w * 128;\n"
    "  unsigned a[4], b[2];\n"
    "  float d[4];\n"
    "  a[0] = cm_pack16(A[g * 16 + 2 * q], A[g * 16 + 2 * q + 1]);\n"
    "  a[1] = cm_pack16(A[(g + 8) * 16 + 2 * q], A[(g + 8) * 16 + 2 * q + 1]);\n"
    "  a[2] = cm_pack16(A[g * 16 + 2 * q + 8], A[g * 16 + 2 * q + 9]);\n"
    "  a[3] = cm_pack16(A[(g + 8) * 16 + 2 * q + 8], A[(g + 8) * 16 + 2 * q + 9]);\n"
    "  b[0] = cm_pack16(B[(2 * q) * 8 + g], B[(2 * q + 1) * 8 + g]);\n"
    "  b[1] = cm_pack16(B[(2 * q + 8) * 8 + g], B[(2 * q + 9) * 8 + g]);\n"
    "  for (int h = 0; h < 4; h++) d[h] = C[(g + (h >> 1) * 8) * 8 + 2 * q + (h & 1)];\n"
    "  if (*bf16) cm_mma_16816<true>(d, a, b);\n"
    "  else cm_mma_16816<false>(d, a, b);\n"
    "  for (int h = 0; h < 4; h++) D[(g + (h >> 1) * 8) * 8 + 2 * q + (h & 1)] = d[h];\n"
    "}\n";

static bool build_with_prelude(const char *kernels, emu_mod *m) {
  char *pre = prelude(), *src = pre ? concat(pre, kernels) : NULL;
  bool ok = src && mod_build(src, m);
  free(pre);
  free(src);
  return ok;
}

/* The value of half h, from its fields. */
static double ref_h2f(unsigned h) {
  double sign = h & 0x8000u ? -1 : 1;
  unsigned e = (h >> 10) & 31u, m = h & 1023u;
  if (e == 31) return m ? NAN : sign * INFINITY;
  return sign * (e ? ldexp(1024 + m, (int)e - 25) : ldexp(m, -24));
}

/* x rounded to the nearest half (ties to even) by arithmetic in double: the
 * quantum of x's binade, nearbyint, then the fields of the result. */
static unsigned ref_f2h(float x) {
  if (isnan(x)) return signbit(x) ? 0xfe00u : 0x7e00u;
  unsigned s = signbit(x) ? 0x8000u : 0;
  double a = fabs((double)x);
  if (a >= 65520.0) return s | 0x7c00u;
  int e;
  frexp(a, &e);
  double q = a < 0x1p-14 ? 0x1p-24 : ldexp(1.0, e - 11);
  double r = nearbyint(a / q) * q;
  if (r < 0x1p-14) return s | (unsigned)(r / 0x1p-24);
  frexp(r, &e);
  return s | (unsigned)(e + 14) << 10 | ((unsigned)(r / ldexp(1.0, e - 11)) - 1024u);
}

static float bits_float(uint32_t b) {
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

static void test_f16_conversions(void) {
  emu_mod m;
  if (!build_with_prelude(K_PRELUDE_USERS, &m)) return;
  /* every half to float */
  float *all = malloc(65536 * sizeof *all);
  void *hargs[] = {&all};
  CHECK(mod_run(&m, "h2f_all", 256, 1, 1, 256, 1, 1, 0, hargs) == 0);
  int bad = 0;
  for (unsigned h = 0; h < 65536; h++) {
    double want = ref_h2f(h);
    bool same = isnan(want) ? isnan(all[h]) : all[h] == want && !signbit(all[h]) == !signbit(want);
    bad += !same;
  }
  CHECK_MSG(bad == 0, "%d of 65536 halves decoded wrong", bad);
  /* floats to half: random bits near and far from the half range, ties between
   * neighbouring halves, halves themselves, and the edges */
  enum { N = 40000 };
  float *in = malloc(N * sizeof *in), *back = malloc(N * sizeof *back);
  unsigned short *h = malloc(N * sizeof *h);
  test_rng rng = {1234};
  static const float edges[] = {0.0f,      -0.0f,        65504.0f,        65519.996f, 65520.0f,
                                -65520.0f, 0x1p-25f,     0x1.000002p-25f, 0x1.8p-24f, 0x1.4p-23f,
                                0x1p-14f,  0x1.ffcp-15f, 1e-10f,          INFINITY,   -INFINITY,
                                NAN,       -NAN,         3.4e38f,         1.0f};
  int n_edges = (int)(sizeof edges / sizeof *edges);
  for (int i = 0; i < N; i++) {
    uint32_t r = test_u32(&rng);
    int kind = i < n_edges ? -1 : i % 4;
    if (kind < 0) {
      in[i] = edges[i];
    } else if (kind == 0) { /* exponents from 2^-27 to 2^18 */
      uint32_t e = 100 + test_u32(&rng) % 46;
      in[i] = bits_float((r & 0x807fffffu) | e << 23);
    } else if (kind == 1) { /* a tie between two neighbours */
      unsigned a = test_u32(&rng) % 0x7bff;
      in[i] = (float)((ref_h2f(a) + ref_h2f(a + 1)) / 2) * (r & 1 ? -1 : 1);
    } else if (kind == 2) {
      unsigned a = test_u32(&rng) & 0xffffu;
      in[i] = (a & 0x7c00u) == 0x7c00u ? 1.5f : (float)ref_h2f(a);
    } else {
      in[i] = bits_float(r);
    }
  }
  int n = N;
  void *args[] = {&in, &h, &back, &(const int *){&n}};
  CHECK(mod_run(&m, "f16_round", 8, 1, 1, 128, 1, 1, 0, args) == 0);
  bad = 0;
  for (int i = 0; i < N; i++) {
    unsigned want = ref_f2h(in[i]);
    double want_back = isnan(in[i]) ? NAN : ref_h2f(want);
    bool ok = h[i] == want && (isnan(want_back) ? isnan(back[i]) : back[i] == want_back);
    if (!ok && bad++ < 5)
      fprintf(stderr, "  %a: half %04x (back %a), want %04x (%a)\n", in[i], h[i], back[i], want,
              want_back);
  }
  CHECK_MSG(bad == 0, "%d of %d floats rounded to half wrong", bad, N);
  free(all);
  free(in);
  free(back);
  free(h);
  mod_free(&m);
}

static void test_mma(void) {
  emu_mod m;
  if (!build_with_prelude(K_PRELUDE_USERS, &m)) return;
  test_rng rng = {99};
  for (int bf16 = 0; bf16 < 2; bf16++) {
    /* two warps, two tiles; eighths times eighths sum exactly in f32 */
    unsigned short A[2 * 256], B[2 * 128];
    float Af[2 * 256], Bf[2 * 128], C[2 * 128], D[2 * 128];
    for (int i = 0; i < 2 * 256; i++) {
      Af[i] = (float)test_int(&rng, -64, 64) / 8;
      uint32_t bits;
      memcpy(&bits, &Af[i], sizeof bits);
      A[i] = bf16 ? (unsigned short)(bits >> 16) : (unsigned short)ref_f2h(Af[i]);
    }
    for (int i = 0; i < 2 * 128; i++) {
      Bf[i] = (float)test_int(&rng, -64, 64) / 8;
      uint32_t bits;
      memcpy(&bits, &Bf[i], sizeof bits);
      B[i] = bf16 ? (unsigned short)(bits >> 16) : (unsigned short)ref_f2h(Bf[i]);
      C[i] = (float)test_int(&rng, -1024, 1024) / 64;
    }
    void *args[] = {&(const unsigned short *){A}, &(const unsigned short *){B}, &(const float *){C},
                    &(float *){D}, &(const int *){&bf16}};
    CHECK(mod_run(&m, "mma_tiles", 1, 1, 1, 64, 1, 1, 0, args) == 0);
    int bad = 0;
    for (int w = 0; w < 2; w++)
      for (int r = 0; r < 16; r++)
        for (int c = 0; c < 8; c++) {
          double want = C[w * 128 + r * 8 + c];
          for (int k = 0; k < 16; k++)
            want += (double)Af[w * 256 + r * 16 + k] * Bf[w * 128 + k * 8 + c];
          bad += D[w * 128 + r * 8 + c] != want;
        }
    CHECK_MSG(bad == 0, "%s: %d of 256 mma results differ from the scalar product",
              bf16 ? "bf16" : "f16", bad);
  }
  mod_free(&m);
}

/* Two builds of one module, and two runs of each, give the same bits (float
 * sums whose order matters). */
static void test_deterministic(void) {
  emu_mod m1, m2;
  if (!mod_build(K_WARP, &m1)) return;
  if (!mod_build(K_WARP, &m2)) {
    mod_free(&m1);
    return;
  }
  test_rng rng = {3};
  float f[256];
  for (int i = 0; i < 256; i++) f[i] = (float)test_uniform_in(&rng, -1, 1) * 1e3f;
  float prefix[3][256];
  double sum[3][256];
  const emu_mod *mods[3] = {&m1, &m2, &m1};
  for (int r = 0; r < 3; r++) {
    void *args[] = {&(const float *){f}, &(double *){sum[r]}, &(float *){prefix[r]}};
    CHECK(mod_run(mods[r], "warp_sums", 2, 1, 1, 128, 1, 1, 0, args) == 0);
  }
  CHECK(!memcmp(sum[0], sum[1], sizeof sum[0]) && !memcmp(sum[0], sum[2], sizeof sum[0]));
  CHECK(!memcmp(prefix[0], prefix[1], sizeof prefix[0]) &&
        !memcmp(prefix[0], prefix[2], sizeof prefix[0]));
  mod_free(&m1);
  mod_free(&m2);
}

/* ---- real kernels ---------------------------------------------------------------- */

/* bf16 bits of f, rounded to nearest even (f finite) */
static unsigned short ref_f2bf(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

/* C = A B (M x K by K x N) as the CUDA backend renders it for sm_90: f32 (FMA
 * tiles) or bf16 (mma.sync tiles), run under the shim against the product in
 * double (eighths: exact in f32, so the bf16 result is its rounding). Returns the
 * GEMM stage's GFLOP/s. */
static double run_gemm(cm_dtype dt, int M, int N, int K) {
  cm_graph *g = cm_graph_new();
  int64_t ad[2] = {M, K}, bd[2] = {K, N};
  int a = cm_input(g, "a", dt, 2, ad), b = cm_input(g, "b", dt, 2, bd);
  int c = cm_matmul(g, a, b, false, false, "c");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, c, &err) == CM_OK);
  cm_target t;
  CHECK(cm_target_cuda("sm_90", &t, &err) == CM_OK);
  cm_compile_opts co = {.compile_only = true, .render_only = true};
  cm_program *pr = NULL;
  CHECK_MSG(cm_compile(g, &t, &co, &pr, &err) == CM_OK, "%s", err.msg);
  const cm_kprogram *kp = pr ? cm_program_kernels(pr) : NULL;
  const cm_graph *pg = pr ? cm_program_graph(pr) : NULL;
  CHECK(kp && kp->n_kernels == 1);
  double gflops = 0;
  if (!kp || kp->n_kernels != 1) goto done;
  const cm_kernel *k = &kp->kernels[0];
  char *src = NULL;
  CHECK(cm_cuda_module_source(k, &t, false, &src, &err) == CM_OK);
  CHECK(src && strstr(src, dt == CM_BF16 ? "cm_mma_16816<true>(acc_" : "(GEMM, FMA)"));
  emu_mod m;
  bool built = src && mod_build(src, &m);
  free(src);
  if (!built) goto done;
  CHECK(m.params(CM_CUDA_MODULE_KERNEL "_s0") == k->n_buffers);
  int na = cm_graph_find(pg, "a"), nbn = cm_graph_find(pg, "b"), nc = cm_graph_find(pg, "c");
  test_rng rng = {(uint64_t)(M * 7 + N)};
  double *av = malloc((size_t)M * K * sizeof *av), *bv = malloc((size_t)K * N * sizeof *bv);
  for (int64_t x = 0; x < (int64_t)M * K; x++) av[x] = (double)test_int(&rng, -64, 64) / 8;
  for (int64_t x = 0; x < (int64_t)K * N; x++) bv[x] = (double)test_int(&rng, -64, 64) / 8;
  void **bufs = calloc((size_t)k->n_buffers, sizeof *bufs),
       **args = calloc((size_t)k->n_buffers, sizeof *args);
  void *cbuf = NULL;
  for (int bi = 0; bi < k->n_buffers; bi++) {
    const cm_kbuffer *kb = &k->buffers[bi];
    size_t es = cm_dtype_size(kb->dtype);
    bufs[bi] = kb->kind == CM_KBUF_CONST ? cm_kernel_const_data(pg, kb, &err)
                                         : calloc((size_t)kb->numel + 1, es);
    args[bi] = &bufs[bi];
    const double *from = kb->node == na ? av : kb->node == nbn ? bv : NULL;
    for (int64_t x = 0; from && x < kb->numel; x++) {
      if (kb->dtype == CM_BF16)
        ((unsigned short *)bufs[bi])[x] = ref_f2bf((float)from[x]);
      else
        ((float *)bufs[bi])[x] = (float)from[x];
    }
    if (kb->node == nc) cbuf = bufs[bi];
  }
  CHECK(cbuf != NULL);
  cm_cuda_render_opts ro = {&t, false};
  double gemm_s = 0;
  for (int st = 0; st < k->n_stages; st++) {
    cm_cuda_launch l = cm_cuda_stage_launch(k, st, &ro);
    char fn[32];
    snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, st);
    /* the best of 3 runs (the machine is shared) */
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
      double s0 = cpu_s();
      CHECK(m.launch(fn, l.grid, l.block, l.shared_bytes, args) == 0);
      best = fmin(best, cpu_s() - s0);
    }
    if (k->stages[st].cuda.kind == CM_KCUDA_GEMM) gemm_s += best;
  }
  gflops = gemm_s > 0 ? 2.0 * M * N * K / gemm_s / 1e9 : 0;
  int bad = 0;
  for (int i = 0; cbuf && i < M; i++)
    for (int j = 0; j < N; j++) {
      double want = 0;
      for (int x = 0; x < K; x++) want += av[(int64_t)i * K + x] * bv[(int64_t)x * N + j];
      int64_t at = (int64_t)i * N + j;
      bool ok = dt == CM_BF16 ? ((unsigned short *)cbuf)[at] == ref_f2bf((float)want)
                              : ((float *)cbuf)[at] == (float)want;
      if (!ok && bad++ < 3) fprintf(stderr, "  C[%d][%d] wrong (want %g)\n", i, j, want);
    }
  CHECK_MSG(bad == 0, "%s GEMM %dx%dx%d: %d of %d wrong", cm_dtype_name(dt), M, N, K, bad, M * N);
  for (int bi = 0; bi < k->n_buffers; bi++) free(bufs[bi]);
  free(bufs);
  free(args);
  free(av);
  free(bv);
  mod_free(&m);
done:
  cm_program_free(pr);
  cm_graph_free(g);
  return gflops;
}

static void test_real_gemms(void) {
  run_gemm(CM_F32, 130, 72, 96);
  run_gemm(CM_BF16, 130, 72, 96);
  double f32 = run_gemm(CM_F32, 256, 256, 256), bf16 = run_gemm(CM_BF16, 256, 256, 256);
  fprintf(stderr, "  256^3 GEMM emulated (CPU time): f32 %.2f GFLOP/s, bf16 (mma) %.2f GFLOP/s\n",
          f32, bf16);
  CHECK(f32 > 0 && bf16 > 0);
}

/* Every kernel of the program once, as a step launches them, each on buffers of
 * its own (floats uniform in [-1, 1], integers zero: indices stay in bounds):
 * what an emulated step costs. Returns the CPU seconds of the launches. */
static double run_step(const cm_program *pr, const cm_cuda_build *b, const cm_target *t,
                       char *slowest, double *slowest_s) {
  const cm_kprogram *kp = cm_program_kernels(pr);
  const cm_graph *g = cm_program_graph(pr);
  emu_mod *mods = calloc((size_t)b->n_modules, sizeof *mods);
  bool loaded = mods != NULL;
  for (int i = 0; loaded && i < b->n_modules; i++)
    loaded = mod_load(&b->modules[i].image, &mods[i]);
  double total = 0;
  *slowest_s = 0;
  test_rng rng = {17};
  cm_cuda_render_opts ro = {t, false};
  for (int ki = 0; loaded && ki < kp->n_kernels; ki++) {
    const cm_kernel *k = &kp->kernels[ki];
    void **bufs = calloc((size_t)k->n_buffers + 1, sizeof *bufs);
    void **args = calloc((size_t)k->n_buffers + 1, sizeof *args);
    cm_err err = {0};
    for (int bi = 0; bi < k->n_buffers; bi++) {
      const cm_kbuffer *kb = &k->buffers[bi];
      bufs[bi] = kb->kind == CM_KBUF_CONST
                     ? cm_kernel_const_data(g, kb, &err)
                     : calloc((size_t)kb->numel + 1, cm_dtype_size(kb->dtype));
      CHECK_MSG(bufs[bi] != NULL, "%s b%d: %s", k->name, bi, err.msg);
      args[bi] = &bufs[bi];
      if (kb->kind != CM_KBUF_CONST && bufs[bi] && kb->dtype == CM_F32)
        for (int64_t x = 0; x < kb->numel; x++)
          ((float *)bufs[bi])[x] = (float)test_uniform_in(&rng, -1, 1);
    }
    double t0 = cpu_s();
    for (int st = 0; st < k->n_stages; st++) {
      cm_cuda_launch l = cm_cuda_stage_launch(k, st, &ro);
      char fn[32];
      snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, st);
      int rc =
          mods[cm_cuda_stage_module(b, ki, st)].launch(fn, l.grid, l.block, l.shared_bytes, args);
      CHECK_MSG(rc == 0, "%s stage %d: CUresult %d", k->name, st, rc);
    }
    double dt = cpu_s() - t0;
    total += dt;
    if (dt > *slowest_s) {
      cm_cuda_launch l = cm_cuda_stage_launch(k, 0, &ro);
      *slowest_s = dt;
      snprintf(slowest, 96, "%s (%d stages, the first %ux%ux%u blocks of %u)", k->name, k->n_stages,
               l.grid[0], l.grid[1], l.grid[2], l.block[0] * l.block[1] * l.block[2]);
    }
    for (int bi = 0; bi < k->n_buffers; bi++) free(bufs[bi]);
    free(bufs);
    free(args);
  }
  for (int i = 0; mods && i < b->n_modules; i++)
    if (mods[i].handle) dlclose(mods[i].handle);
  free(mods);
  return total;
}

/* Every distinct kernel of a tiny variant's training step (batch 2) built as the
 * CUDA backend builds them (cm_cuda_build_program, one module per distinct kernel)
 * by emu_compiler(): a missing intrinsic or a construct the shim lacks fails here. */
static void compile_variant(const char *path) {
  double t0 = now_s();
  cm_err err = {0};
  cm_graph *step = test_build_step(path, NULL, 0, 2, NULL, NULL, NULL);
  if (!step) return;
  cm_target t;
  CHECK(cm_target_cuda("sm_90", &t, &err) == CM_OK);
  cm_cuda_backend_opts cbo = {.compiler = emu_compiler(), .compile_threads = 2};
  cm_compile_opts co = {.compile_only = true, .cache_dir = "", .backend_opts = &cbo};
  cm_program *pr = NULL;
  cm_status st = cm_compile(step, &t, &co, &pr, &err);
  CHECK_MSG(st == CM_OK, "%s: %s", path, err.msg);
  const cm_cuda_build *b = pr ? cm_program_cuda_build(pr) : NULL;
  CHECK(b && b->n_modules > 10);
  int functions = 0;
  double module_ms = 0;
  for (int i = 0; b && i < b->n_modules; i++) {
    const cm_cubin *im = &b->modules[i].image;
    functions += im->n_kernels;
    module_ms += im->compile_ms;
    /* the scanner found one function per stage the module holds, in order (a large
     * kernel is split at its stages into parts) */
    const cm_cuda_module *mo = &b->modules[i];
    const cm_kernel *k = &cm_program_kernels(pr)->kernels[mo->kernel];
    CHECK_MSG(im->n_kernels == mo->stage_end - mo->stage_begin && im->n_kernels >= 1,
              "%s: %d functions for stages [%d, %d)", k->name, im->n_kernels, mo->stage_begin,
              mo->stage_end);
    char first[32], last[32];
    snprintf(first, sizeof first, "%s_s%d", CM_CUDA_MODULE_KERNEL, mo->stage_begin);
    snprintf(last, sizeof last, "%s_s%d", CM_CUDA_MODULE_KERNEL, mo->stage_end - 1);
    CHECK(im->n_kernels >= 1 && !strcmp(im->kernels[0].name, first) &&
          !strcmp(im->kernels[im->n_kernels - 1].name, last));
  }
  if (b)
    fprintf(stderr,
            "  %s: %d modules (%d functions), %.1f s (compile %.1f s on %d threads, %.2f s a "
            "module)\n",
            path, b->n_modules, functions, now_s() - t0, b->compile_ms / 1e3, b->threads,
            module_ms / 1e3 / b->n_modules);
  if (b) {
    char slowest[96] = "";
    double slowest_s = 0, step_s = run_step(pr, b, &t, slowest, &slowest_s);
    fprintf(stderr, "  %s: one step emulated in %.2f s of CPU (the slowest kernel %s: %.2f s)\n",
            path, step_s, slowest, slowest_s);
    CHECK(step_s > 0);
  }
  cm_program_free(pr);
  cm_graph_free(step);
}

static void test_tiny_variants(void) {
  compile_variant("models/cmae_vit_tiny_fmnist.json");
  compile_variant("models/cmae_convvit_tiny_fmnist.json");
}

TEST_MAIN(TEST(test_indexing_3d), TEST(test_barriers_and_shared),
          TEST(test_launch_limits_and_deadlock), TEST(test_switch_costs), TEST(test_out_of_bounds),
          TEST(test_shuffles), TEST(test_votes), TEST(test_atomics), TEST(test_f16_conversions),
          TEST(test_mma), TEST(test_deterministic), TEST(test_real_gemms), TEST(test_tiny_variants))
