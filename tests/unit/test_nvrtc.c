/* tests/unit/test_nvrtc.c — NVRTC through dlopen: CUDA C to CUBIN for sm_80 and sm_90, the
 * ptxas resource figures, compile errors, bad architectures. NVRTC is part of the base image
 * (here and on CI), so a missing NVRTC fails the test rather than skipping it. */
#include "codegen/codegen.h"
#include "tests/test.h"

#include <time.h>

/* Declared in codegen/nvrtc.c; to move into codegen/codegen.h. */
static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static cm_nvrtc *nvrtc; /* loaded once, on first use (so each test also runs alone) */
static double load_ms;

/* NVRTC is required: a failure to load it fails the test. */
static cm_nvrtc *need_nvrtc(void) {
  static bool tried;
  if (!tried) {
    tried = true;
    cm_err err = {0};
    double t0 = now_ms();
    cm_status st = cm_nvrtc_load(&nvrtc, &err);
    load_ms = now_ms() - t0;
    CHECK_MSG(st == CM_OK && nvrtc, "NVRTC must be installed (CUDA toolkit): %s", err.msg);
  }
  return nvrtc;
}

static const char *const ARCHS[] = {"sm_80", "sm_90"};

static const char *ELEMENTWISE =
    "extern \"C\" __global__ void axpy_f32(float *y, const float *x, float a, int n) {\n"
    "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
    "  if (i < n) y[i] = a * x[i] + y[i];\n"
    "}\n";

/* One warp multiplies a 16x16 bf16 A (row-major) by a 16x8 bf16 B (stored column-major) into a
 * 16x8 f32 C with one tensor-core mma. */
static const char *MMA_BF16 =
    "#include <cuda_bf16.h>\n"
    "extern \"C\" __global__ void mma_bf16(const __nv_bfloat16 *A, const __nv_bfloat16 *B,\n"
    "                                      float *C) {\n"
    "  int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;\n"
    "  const unsigned *a32 = reinterpret_cast<const unsigned *>(A);\n"
    "  const unsigned *b32 = reinterpret_cast<const unsigned *>(B);\n"
    "  unsigned a0 = a32[g * 8 + t], a1 = a32[(g + 8) * 8 + t];\n"
    "  unsigned a2 = a32[g * 8 + t + 4], a3 = a32[(g + 8) * 8 + t + 4];\n"
    "  unsigned b0 = b32[g * 8 + t], b1 = b32[g * 8 + t + 4];\n"
    "  float c0 = 0.f, c1 = 0.f, c2 = 0.f, c3 = 0.f;\n"
    "  asm volatile(\"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 \"\n"
    "               \"{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\\n\"\n"
    "               : \"+f\"(c0), \"+f\"(c1), \"+f\"(c2), \"+f\"(c3)\n"
    "               : \"r\"(a0), \"r\"(a1), \"r\"(a2), \"r\"(a3), \"r\"(b0), \"r\"(b1));\n"
    "  C[g * 8 + 2 * t] = c0; C[g * 8 + 2 * t + 1] = c1;\n"
    "  C[(g + 8) * 8 + 2 * t] = c2; C[(g + 8) * 8 + 2 * t + 1] = c3;\n"
    "}\n";

static bool is_elf(const cm_cubin *c) {
  const unsigned char *d = c->data;
  return d && c->size > 4 && d[0] == 0x7f && d[1] == 'E' && d[2] == 'L' && d[3] == 'F';
}

static void test_load(void) {
  if (!need_nvrtc()) return;
  fprintf(stderr, "  NVRTC %s loaded in %.2f ms\n", cm_nvrtc_version(nvrtc), load_ms);
  CHECK(atoi(cm_nvrtc_version(nvrtc)) >= 11);
}

static void test_not_found(void) {
  setenv("CMAEC_NVRTC_LIBRARY", "/nonexistent/libnvrtc.so.99", 1);
  cm_nvrtc *n = (cm_nvrtc *)&n; /* must be reset to NULL */
  cm_err err = {0};
  cm_status st = cm_nvrtc_load(&n, &err);
  unsetenv("CMAEC_NVRTC_LIBRARY");
  CHECK(st == CM_EINVALID);
  CHECK(n == NULL);
  CHECK_STR_CONTAINS(err.msg, "NVRTC not found: ");
  CHECK_STR_CONTAINS(err.msg, "/nonexistent/libnvrtc.so.99");
  cm_nvrtc_unload(NULL); /* a no-op */
}

static void test_elementwise(void) {
  if (!need_nvrtc()) return;
  for (int a = 0; a < 2; a++) {
    cm_cubin c;
    cm_err err = {0};
    cm_status st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", ARCHS[a], NULL, 0, &c, &err);
    CHECK_MSG(st == CM_OK, "%s: %s", ARCHS[a], err.msg);
    CHECK(is_elf(&c));
    CHECK(c.log != NULL);
    CHECK_STR_CONTAINS(c.log ? c.log : "", ARCHS[a]);
    CHECK(c.n_kernels == 1);
    const cm_cuda_kernel_info *k = cm_cubin_kernel(&c, "axpy_f32");
    CHECK_MSG(k != NULL, "log:\n%s", c.log ? c.log : "");
    if (k) {
      CHECK(k->registers > 0 && k->registers < 64);
      CHECK(k->stack_bytes == 0);
      CHECK(k->spill_store_bytes == 0 && k->spill_load_bytes == 0);
      CHECK(k->shared_bytes == 0);
      CHECK(k->const_bytes >= 0);
      fprintf(stderr, "  axpy_f32 %s: %d registers, %zu-byte CUBIN, %.1f ms\n", ARCHS[a],
              k->registers, c.size, c.compile_ms);
    }
    CHECK(cm_cubin_kernel(&c, "nope") == NULL);
    cm_cubin_free(&c);
    CHECK(c.data == NULL && c.log == NULL && c.kernels == NULL);
  }
}

static void test_mma_bf16(void) {
  if (!need_nvrtc()) return;
  for (int a = 0; a < 2; a++) {
    cm_cubin c;
    cm_err err = {0};
    cm_status st = cm_nvrtc_compile(nvrtc, MMA_BF16, "mma.cu", ARCHS[a], NULL, 0, &c, &err);
    CHECK_MSG(st == CM_OK, "%s: %s", ARCHS[a], err.msg);
    CHECK(is_elf(&c));
    const cm_cuda_kernel_info *k = cm_cubin_kernel(&c, "mma_bf16");
    CHECK(k != NULL);
    if (k) {
      CHECK(k->registers >= 10); /* 4 A + 2 B + 4 C registers at least */
      CHECK(k->spill_store_bytes == 0 && k->spill_load_bytes == 0);
      fprintf(stderr, "  mma_bf16 %s: %d registers, %.1f ms\n", ARCHS[a], k->registers,
              c.compile_ms);
    }
    cm_cubin_free(&c);
  }
}

/* Two kernels in one source, static shared memory, and extra options (-D) that the source needs. */
static void test_two_kernels_shared_and_options(void) {
  if (!need_nvrtc()) return;
  const char *src =
      "#ifndef TILE\n"
      "#error TILE must be defined\n"
      "#endif\n"
      "extern \"C\" __global__ void row_sum(const float *x, float *y) {\n"
      "  __shared__ float s[TILE];\n"
      "  s[threadIdx.x] = x[blockIdx.x * TILE + threadIdx.x];\n"
      "  __syncthreads();\n"
      "  for (int h = TILE / 2; h > 0; h /= 2) {\n"
      "    if (threadIdx.x < h) s[threadIdx.x] += s[threadIdx.x + h];\n"
      "    __syncthreads();\n"
      "  }\n"
      "  if (threadIdx.x == 0) y[blockIdx.x] = s[0];\n"
      "}\n"
      "extern \"C\" __global__ void scale(float *y, float a) { y[threadIdx.x] *= a; }\n";
  const char *opts[] = {"-DTILE=256", "--use_fast_math"};
  cm_cubin c;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, src, "rows.cu", "sm_90", opts, 2, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(c.n_kernels == 2);
  const cm_cuda_kernel_info *rs = cm_cubin_kernel(&c, "row_sum");
  const cm_cuda_kernel_info *sc = cm_cubin_kernel(&c, "scale");
  CHECK(rs && sc);
  if (rs) CHECK(rs->shared_bytes == 256 * 4);
  if (sc) CHECK(sc->shared_bytes == 0 && sc->registers > 0);
  cm_cubin_free(&c);

  /* Without the option the #error fires. */
  st = cm_nvrtc_compile(nvrtc, src, "rows.cu", "sm_90", NULL, 0, &c, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "TILE must be defined");
  cm_cubin_free(&c);
}

static void test_syntax_error(void) {
  if (!need_nvrtc()) return;
  const char *src = "extern \"C\" __global__ void broken(float *y) {\n"
                    "  y[threadIdx.x] = 1.0f\n" /* missing ';' */
                    "}\n";                      /* reported at line 3, where the ';' was expected */
  cm_cubin c;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, src, "broken_kernel.cu", "sm_90", NULL, 0, &c, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "broken_kernel.cu");
  CHECK_STR_CONTAINS(err.msg, "error");
  CHECK_STR_CONTAINS(err.msg, "\";\""); /* NVRTC: expected a ";" */
  CHECK(strchr(err.msg, '\n') == NULL);
  CHECK(c.data == NULL && c.size == 0 && c.n_kernels == 0);
  CHECK(c.log && strstr(c.log, "broken_kernel.cu(3): error") != NULL); /* the whole log is kept */
  cm_cubin_free(&c);

  /* An unknown option is an error too. */
  const char *bad_opt[] = {"--no-such-option"};
  st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", "sm_90", bad_opt, 1, &c, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "axpy.cu");
  cm_cubin_free(&c);
}

static void test_stack_and_spills(void) {
  if (!need_nvrtc()) return;
  /* A dynamically indexed local array cannot live in registers: it goes to the stack frame. */
  const char *src = "extern \"C\" __global__ void local_array(float *out, const int *idx) {\n"
                    "  float buf[512];\n"
                    "  for (int i = 0; i < 512; i++) buf[i] = out[i] * (float)i;\n"
                    "  out[threadIdx.x] = buf[idx[threadIdx.x] & 511];\n"
                    "}\n";
  cm_cubin c;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, src, "local.cu", "sm_80", NULL, 0, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  const cm_cuda_kernel_info *k = cm_cubin_kernel(&c, "local_array");
  CHECK(k != NULL);
  if (k) {
    CHECK_MSG(k->stack_bytes >= 512 * 4, "stack %d", k->stack_bytes);
    fprintf(stderr, "  local_array sm_80: %d-byte stack, spills %d/%d\n", k->stack_bytes,
            k->spill_store_bytes, k->spill_load_bytes);
  }
  cm_cubin_free(&c);

  /* Many live values under a register cap: ptxas must spill. */
  const char *pressure = "extern \"C\" __global__ void pressure(float *out, const float *in) {\n"
                         "  float v[64];\n"
                         "#pragma unroll\n"
                         "  for (int i = 0; i < 64; i++) v[i] = in[threadIdx.x + i * 32];\n"
                         "  float acc = 0.f;\n"
                         "#pragma unroll\n"
                         "  for (int r = 0; r < 8; r++)\n"
                         "#pragma unroll\n"
                         "    for (int i = 0; i < 64; i++) acc += v[i] * v[(i + r) & 63];\n"
                         "#pragma unroll\n"
                         "  for (int i = 0; i < 64; i++) out[threadIdx.x + i * 32] = v[i] + acc;\n"
                         "}\n";
  const char *cap[] = {"--maxrregcount=24"};
  st = cm_nvrtc_compile(nvrtc, pressure, "pressure.cu", "sm_90", cap, 1, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  k = cm_cubin_kernel(&c, "pressure");
  CHECK(k != NULL);
  if (k) {
    CHECK(k->registers <= 24);
    CHECK_MSG(k->spill_store_bytes > 0 && k->spill_load_bytes > 0, "log:\n%s", c.log);
    CHECK(k->stack_bytes > 0);
    fprintf(stderr, "  pressure sm_90 (24 regs): %d registers, %d-byte stack, spills %d/%d\n",
            k->registers, k->stack_bytes, k->spill_store_bytes, k->spill_load_bytes);
  }
  cm_cubin_free(&c);
}

static void test_bad_arch(void) {
  if (!need_nvrtc()) return;
  const char *bad[] = {"sm_13", "sm_999", "gfx90a", "sm_", "sm_90xyz", "compute_90", ""};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cm_cubin c;
    cm_err err = {0};
    cm_status st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", bad[i], NULL, 0, &c, &err);
    CHECK_MSG(st == CM_EINVALID, "arch \"%s\"", bad[i]);
    CHECK_STR_CONTAINS(err.msg, "axpy.cu");
    CHECK_STR_CONTAINS(err.msg, bad[i]);
    CHECK(c.data == NULL);
    cm_cubin_free(&c);
  }
  cm_cubin c;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", "sm_13", NULL, 0, &c, &err);
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "supported: ");
  CHECK_STR_CONTAINS(err.msg, "sm_90");
  st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", NULL, NULL, 0, &c, &err);
  CHECK(st == CM_EINVALID);
  /* sm_90a (Hopper-specific features) is accepted. */
  st = cm_nvrtc_compile(nvrtc, ELEMENTWISE, "axpy.cu", "sm_90a", NULL, 0, &c, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  CHECK(is_elf(&c));
  cm_cubin_free(&c);
}

/* The parser on a hand-written log: a device function's properties are not a kernel's, smem and
 * cmem figures, a mangled name, a log without trailing newline. */
static void test_ptxas_parse(void) {
  const char *log =
      "ptxas info    : 0 bytes gmem\n"
      "ptxas info    : Function properties for helper_fn\n"
      "    48 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads\n"
      "ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'\n"
      "ptxas info    : Function properties for _Z3fooPf\n"
      "    16 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
      "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]\n"
      "ptxas info    : Compiling entry function 'bar' for 'sm_90'\n"
      "ptxas info    : Function properties for helper2\n"
      "ptxas         .     99 bytes stack frame, 7 bytes spill stores, 7 bytes spill loads\n"
      "ptxas info    : Used 8 registers, 368 bytes cmem[0]";
  cm_cuda_kernel_info *k = NULL;
  int n = 0;
  cm_err err = {0};
  CHECK(cm_ptxas_parse(log, &k, &n, &err) == CM_OK);
  CHECK(n == 2);
  if (n == 2) {
    CHECK(strcmp(k[0].name, "_Z3fooPf") == 0);
    CHECK(k[0].registers == 40 && k[0].stack_bytes == 16);
    CHECK(k[0].spill_store_bytes == 4 && k[0].spill_load_bytes == 12);
    CHECK(k[0].shared_bytes == 2048 && k[0].const_bytes == 360);
    CHECK(strcmp(k[1].name, "bar") == 0);
    CHECK(k[1].registers == 8 && k[1].stack_bytes == 0 && k[1].spill_store_bytes == 0);
    CHECK(k[1].shared_bytes == 0 && k[1].const_bytes == 368);
  }
  free(k);
  CHECK(cm_ptxas_parse("", &k, &n, &err) == CM_OK && n == 0 && k == NULL);
  CHECK(cm_ptxas_parse(NULL, &k, &n, &err) == CM_OK && n == 0);
}

/* The toolkit include dir (for cuda_bf16.h) can be overridden at run time; a wrong one fails. */
static void test_include_dir(void) {
  if (!need_nvrtc()) return;
  setenv("CMAEC_CUDA_INCLUDE_DIR", "/nonexistent/cuda/include", 1);
  cm_cubin c;
  cm_err err = {0};
  cm_status st = cm_nvrtc_compile(nvrtc, MMA_BF16, "mma.cu", "sm_90", NULL, 0, &c, &err);
  unsetenv("CMAEC_CUDA_INCLUDE_DIR");
  CHECK(st == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "cuda_bf16.h");
  cm_cubin_free(&c);
}

/* A log of many kernels parses in linear time and keeps them apart. */
static void test_ptxas_parse_large(void) {
  enum { N = 5000 };
  size_t cap = (size_t)N * 400, len = 0;
  char *log = malloc(cap);
  CHECK(log != NULL);
  if (!log) return;
  for (int i = 0; i < N; i++)
    len += (size_t)snprintf(log + len, cap - len,
                            "ptxas info    : Compiling entry function 'k%d' for 'sm_90'\n"
                            "ptxas info    : Function properties for k%d\n"
                            "ptxas         .     %d bytes stack frame, 0 bytes spill stores, 0 "
                            "bytes spill loads\n"
                            "ptxas info    : Used %d registers, used 0 barriers\n",
                            i, i, 8 * (i % 3), 16 + i % 200);
  cm_cuda_kernel_info *k = NULL;
  int n = 0;
  cm_err err = {0};
  double t0 = now_ms();
  CHECK(cm_ptxas_parse(log, &k, &n, &err) == CM_OK);
  double ms = now_ms() - t0;
  CHECK(n == N);
  if (n == N) {
    CHECK(strcmp(k[N - 1].name, "k4999") == 0);
    CHECK(k[N - 1].registers == 16 + 4999 % 200 && k[N - 1].stack_bytes == 8 * (4999 % 3));
    CHECK(k[1234].registers == 16 + 1234 % 200 && k[1234].stack_bytes == 8 * (1234 % 3));
  }
  fprintf(stderr, "  parsed a %zu-byte log of %d kernels in %.1f ms\n", len, n, ms);
  free(k);
  free(log);
}

/* First compile in the process vs later ones (reported, and later ones must not be slower). */
static void test_compile_times(void) {
  if (!need_nvrtc()) return;
  double t[4];
  for (int i = 0; i < 4; i++) {
    cm_cubin c;
    cm_err err = {0};
    cm_status st = cm_nvrtc_compile(nvrtc, MMA_BF16, "mma.cu", "sm_90", NULL, 0, &c, &err);
    CHECK(st == CM_OK);
    t[i] = c.compile_ms;
    CHECK(c.compile_ms > 0);
    cm_cubin_free(&c);
  }
  fprintf(stderr, "  mma_bf16 sm_90, 4 compiles in a row: %.1f %.1f %.1f %.1f ms\n", t[0], t[1],
          t[2], t[3]);
}

static void test_unload(void) {
  cm_nvrtc_unload(nvrtc);
  nvrtc = NULL;
}

TEST_MAIN(TEST(test_load), TEST(test_not_found), TEST(test_ptxas_parse), TEST(test_elementwise),
          TEST(test_mma_bf16), TEST(test_two_kernels_shared_and_options), TEST(test_syntax_error),
          TEST(test_stack_and_spills), TEST(test_bad_arch), TEST(test_include_dir),
          TEST(test_ptxas_parse_large), TEST(test_compile_times), TEST(test_unload))
