/* tests/unit/test_cuda_gemm_emu.c — the tensor-core GEMM pipeline on the emulated CUDA device
 * (tests/emu/emu.h). First the prelude's PTX helpers (codegen/render_cuda.c PRELUDE_TILES),
 * each in a tiny kernel against a scalar reference of the PTX ISA's definition: ldmatrix (x1,
 * x2, x4, .trans), cp.async with its groups and zero-fill, bf16x2/f16x2 packing, and an
 * m16n8k16 mma fed by ldmatrix fragments in both B layouts. Then the template itself
 * (codegen/render_cuda_mma.c): graphs with bf16 GEMMs at odd shapes, batched, with either operand
 * transposed, split-K, operands read by cp.async or through a prologue (a cast of f32), and an
 * epilogue (bias, GELU, cast), run by the CUDA backend on the emulated device; every output
 * within the oracle's forward error bound (cm_eval_bounded). */
#define _GNU_SOURCE
#include "../test.h"
#include "../testlib.h"
#include "../tensor_compare.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "runtime/runtime.h"
#include "tests/emu/emu.h"

#include <dlfcn.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

/* ---- modules: built by emu_compiler(), loaded here -------------------------------------- */

typedef struct emu_mod {
  void *handle;
  emu_module_launch_fn launch;
  cm_cubin image;
} emu_mod;

static bool mod_load(emu_mod *m) {
  emu_image_header h;
  CHECK(m->image.size > sizeof h);
  if (m->image.size <= sizeof h) return false;
  memcpy(&h, m->image.data, sizeof h);
  CHECK(!memcmp(h.magic, EMU_IMAGE_MAGIC, sizeof h.magic));
  char path[] = "/tmp/cmaec_gemm_emu_XXXXXX";
  int fd = mkstemp(path);
  CHECK(fd >= 0);
  if (fd < 0) return false;
  bool wrote = write(fd, (char *)m->image.data + sizeof h, h.so_bytes) == (ssize_t)h.so_bytes;
  close(fd);
  m->handle = wrote ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
  CHECK_MSG(m->handle != NULL, "%s", wrote ? dlerror() : "not written");
  unlink(path);
  void *l = m->handle ? dlsym(m->handle, EMU_MODULE_LAUNCH_SYMBOL) : NULL;
  CHECK(l != NULL);
  if (l) memcpy(&m->launch, &l, sizeof l);
  return l != NULL;
}

static bool mod_build(const char *src, emu_mod *m) {
  memset(m, 0, sizeof *m);
  const cm_cuda_compiler *c = emu_compiler();
  cm_err err = {0};
  cm_status st = c->compile(c->self, src, "gemm_test", "sm_80", &m->image, &err);
  CHECK_MSG(st == CM_OK, "%s\n%.4000s", err.msg, m->image.log ? m->image.log : "");
  return st == CM_OK && mod_load(m);
}

static void mod_free(emu_mod *m) {
  if (m->handle) dlclose(m->handle);
  cm_cubin_free(&m->image);
  memset(m, 0, sizeof *m);
}

static int mod_run(const emu_mod *m, const char *name, unsigned blocks, unsigned threads,
                   void **args) {
  unsigned grid[3] = {blocks, 1, 1}, block[3] = {threads, 1, 1};
  return m->launch(name, grid, block, 0, args);
}

/* kernels after the renderer's sm_80 prelude (which has the tensor-core helpers) */
static bool build_with_prelude(const char *kernels, emu_mod *m) {
  cm_kernel empty;
  cm_kernel_init(&empty, "none");
  cm_target t;
  cm_err err = {0};
  char *pre = NULL;
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  cm_cuda_render_opts ro = {&t, false};
  CHECK_MSG(cm_render_cuda(&empty, &ro, true, &pre, &err) == CM_OK, "%s", err.msg);
  cm_kernel_free(&empty);
  if (!pre) return false;
  size_t np = strlen(pre), nk = strlen(kernels);
  char *src = malloc(np + nk + 1);
  bool ok = false;
  if (src) {
    memcpy(src, pre, np);
    memcpy(src + np, kernels, nk + 1);
    ok = mod_build(src, m);
  }
  free(pre);
  free(src);
  return ok;
}

/* bf16 bits of finite f, to nearest even */
static unsigned ref_f2bf(float f) {
  uint32_t b;
  memcpy(&b, &f, sizeof b);
  return (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
}
static float bf2f(unsigned h) {
  uint32_t b = h << 16;
  float f;
  memcpy(&f, &b, sizeof f);
  return f;
}

/* ---- the helpers ---------------------------------------------------------------------- */

static const char *const K_HELPERS =
    /* a 32 x 40 tile of b16 (80-byte rows: 16-byte aligned) in shared memory; lane l passes
     * row (perm[l] & 7) + 8 ((l >> 3) & 1) at column 8 (l >> 4) + 8 * colblk: matrices 0..3 are
     * the 16 x 16 block's quarters (rows within a matrix permuted by perm). out[l * 4 + i] */
    "extern \"C\" __global__ void ldm(const unsigned short *in, const int *perm, const int *mode,\n"
    "                                 unsigned *out) {\n"
    "  __shared__ __align__(16) unsigned short t[32][40];\n"
    "  for (int i = threadIdx.x; i < 32 * 40; i += blockDim.x) t[i / 40][i % 40] = in[i];\n"
    "  __syncthreads();\n"
    "  const int l = threadIdx.x & 31, w = threadIdx.x >> 5;\n"
    "  const unsigned short *row = &t[w * 16 + (perm[l] & 7) + 8 * ((l >> 3) & 1)][8 * (l >> "
    "4) + 8 * w];\n"
    "  unsigned r[4] = {0, 0, 0, 0};\n"
    "  switch (*mode) {\n"
    "  case 0: cm_ldmatrix<4, false>(r, row); break;\n"
    "  case 1: cm_ldmatrix<4, true>(r, row); break;\n"
    "  case 2: cm_ldmatrix<2, false>(r, row); break;\n"
    "  case 3: cm_ldmatrix<2, true>(r, row); break;\n"
    "  case 4: cm_ldmatrix<1, false>(r, row); break;\n"
    "  default: cm_ldmatrix<1, true>(r, row); break;\n"
    "  }\n"
    "  for (int i = 0; i < 4; i++) out[threadIdx.x * 4 + i] = r[i];\n"
    "}\n"
    /* thread t: group 0 copies src[t] (16 bytes) into a, group 1 src[t + n] into b (src_bytes
     * 0 for odd t: zeros); seen[t] = {a and b before any wait, a after wait<1>, b after
     * wait<0>} as their first words, the buffers preset to 0xffffffff */
    "extern \"C\" __global__ void cpa(const uint4 *src, unsigned *seen) {\n"
    "  __shared__ __align__(16) uint4 a[64], b[64];\n"
    "  const int t = threadIdx.x, n = blockDim.x;\n"
    "  a[t] = b[t] = make_uint4(~0u, ~0u, ~0u, ~0u);\n"
    "  cm_cp_async16(&a[t], &src[t], 16);\n"
    "  cm_cp_async_commit();\n"
    "  cm_cp_async16(&b[t], &src[t + n], t & 1 ? 0 : 16);\n"
    "  cm_cp_async_commit();\n"
    "  seen[t * 8 + 0] = a[t].x;\n"
    "  seen[t * 8 + 1] = b[t].x;\n"
    "  cm_cp_async_wait<1>();\n"
    "  seen[t * 8 + 2] = a[t].x;\n"
    "  seen[t * 8 + 3] = a[t].w;\n"
    "  cm_cp_async_wait<0>();\n"
    "  seen[t * 8 + 4] = b[t].x;\n"
    "  seen[t * 8 + 5] = b[t].y;\n"
    "  seen[t * 8 + 6] = b[t].z;\n"
    "  seen[t * 8 + 7] = b[t].w;\n"
    "}\n"
    "extern \"C\" __global__ void pack(const float *in, const int *n, unsigned *bf, unsigned *h,\n"
    "                                  unsigned short *h1) {\n"
    "  for (int i = threadIdx.x; 2 * i + 1 < *n; i += blockDim.x) {\n"
    "    bf[i] = cm_pack_bf16x2(in[2 * i], in[2 * i + 1]);\n"
    "    h[i] = cm_pack_f16x2(in[2 * i], in[2 * i + 1]);\n"
    "    h1[2 * i] = cm_f2h(in[2 * i]);\n"
    "    h1[2 * i + 1] = cm_f2h(in[2 * i + 1]);\n"
    "  }\n"
    "}\n"
    /* D = A B + C for a 16x16 A (row-major) and a 16x8 B given as Bt[n][k] (bt = 1) or
     * B[k][n], fragments by ldmatrix from shared memory: A x4, B x2 (B[k][n]: .trans) */
    "extern \"C\" __global__ void mma_ldm(const unsigned short *A, const unsigned short *B,\n"
    "                                     const int *bt, const float *C, float *D) {\n"
    "  __shared__ __align__(16) unsigned short As[16][24], Bs[16][24];\n"
    "  const int l = threadIdx.x, g = l >> 2, q = l & 3;\n"
    "  for (int i = l; i < 256; i += 32) As[i / 16][i % 16] = A[i];\n"
    "  for (int i = l; i < 128; i += 32)\n"
    "    if (*bt) Bs[i / 16][i % 16] = B[i];\n"
    "    else Bs[i / 8][i % 8] = B[i];\n"
    "  __syncthreads();\n"
    "  unsigned a[4], b[2];\n"
    "  cm_ldmatrix<4, false>(a, &As[(l & 7) + 8 * ((l >> 3) & 1)][8 * (l >> 4)]);\n"
    "  if (*bt) cm_ldmatrix<2, false>(b, &Bs[l & 7][8 * ((l >> 3) & 1)]);\n"
    "  else cm_ldmatrix<2, true>(b, &Bs[(l & 7) + 8 * ((l >> 3) & 1)][0]);\n"
    "  float d[4];\n"
    "  for (int h = 0; h < 4; h++) d[h] = C[(g + (h >> 1) * 8) * 8 + 2 * q + (h & 1)];\n"
    "  cm_mma_16816<true>(d, a, b);\n"
    "  for (int h = 0; h < 4; h++) D[(g + (h >> 1) * 8) * 8 + 2 * q + (h & 1)] = d[h];\n"
    "}\n";

/* ldmatrix in every width, plain and transposed, two warps on two blocks of the tile */
static void test_ldmatrix(emu_mod *m) {
  unsigned short in[32 * 40];
  for (int i = 0; i < 32 * 40; i++) in[i] = (unsigned short)(i * 7 + 3);
  int perm[32];
  for (int l = 0; l < 32; l++) perm[l] = (l * 5 + 3) & 7; /* rows out of order */
  unsigned out[64 * 4];
  for (int mode = 0; mode < 6; mode++) {
    int nmat = mode < 2 ? 4 : mode < 4 ? 2 : 1;
    bool trans = mode & 1;
    memset(out, 0, sizeof out);
    void *args[] = {&(const unsigned short *){in}, &(const int *){perm}, &(const int *){&mode},
                    &(unsigned *){out}};
    CHECK(mod_run(m, "ldm", 1, 64, args) == 0);
    int bad = 0;
    for (int w = 0; w < 2; w++)
      for (int l = 0; l < 32; l++)
        for (int i = 0; i < nmat; i++) {
          /* matrix i's row r is what lane 8i + r passed */
          int g = l >> 2, c = 2 * (l & 3), want[2];
          for (int e = 0; e < 2; e++) {
            int r = trans ? c + e : g, col = trans ? g : c + e, lane = 8 * i + r;
            int trow = w * 16 + (perm[lane] & 7) + 8 * ((lane >> 3) & 1);
            int tcol = 8 * (lane >> 4) + 8 * w + col;
            want[e] = in[trow * 40 + tcol];
          }
          unsigned got = out[(w * 32 + l) * 4 + i];
          bad += got != ((unsigned)want[0] | (unsigned)want[1] << 16);
        }
    CHECK_MSG(bad == 0, "ldmatrix x%d%s: %d registers differ from the PTX definition", nmat,
              trans ? ".trans" : "", bad);
  }
}

/* cp.async lands at the wait that covers its group; src_bytes 0 zero-fills */
static void test_cp_async(emu_mod *m) {
  enum { T = 64 };
  unsigned src[2 * T * 4], seen[T * 8];
  for (int i = 0; i < 2 * T * 4; i++) src[i] = 0x1000u + (unsigned)i;
  void *args[] = {&(const unsigned *){src}, &(unsigned *){seen}};
  CHECK(mod_run(m, "cpa", 1, T, args) == 0);
  int early = 0, bad = 0;
  for (int t = 0; t < T; t++) {
    const unsigned *s = &seen[t * 8];
    /* the emulator lands copies only at the wait: a read before it sees the old contents */
    early += s[0] != ~0u || s[1] != ~0u;
    bad += s[2] != src[t * 4] || s[3] != src[t * 4 + 3];
    for (int e = 0; e < 4; e++) bad += s[4 + e] != (t & 1 ? 0u : src[(T + t) * 4 + e]);
  }
  CHECK_MSG(early == 0, "%d threads saw a copy land before its wait", early);
  CHECK_MSG(bad == 0, "%d threads saw wrong data after the waits", bad);
}

/* two floats to bf16x2 and f16x2: ties, overflow, subnormals, NaN (canonical 0x7fff) */
static void test_pack(emu_mod *m) {
  enum { N = 4096 };
  float in[N];
  static const float edges[] = {0.0f,     -0.0f,        1.0f,      0x1.008p0f,  0x1.018p0f,
                                -3.0e38f, 3.3961e38f,   3.4e38f,   INFINITY,    -INFINITY,
                                NAN,      -NAN,         0x1p-133f, 0x1.8p-134f, 65504.0f,
                                65520.0f, 0x1.ffcp-15f, 0x1p-25f};
  int ne = (int)(sizeof edges / sizeof *edges);
  test_rng rng = {17};
  for (int i = 0; i < N; i++) {
    uint32_t r = test_u32(&rng);
    if (i < ne)
      in[i] = edges[i];
    else if (i % 2) /* a bf16 tie */
      in[i] = (bf2f(r >> 16 & 0x7eff) + bf2f((r >> 16 & 0x7eff) + 1)) / 2;
    else
      memcpy(&in[i], &r, sizeof r);
  }
  unsigned bf[N / 2], h[N / 2];
  unsigned short h1[N];
  int n = N;
  void *args[] = {&(const float *){in}, &(const int *){&n}, &(unsigned *){bf}, &(unsigned *){h},
                  &(unsigned short *){h1}};
  CHECK(mod_run(m, "pack", 1, 128, args) == 0);
  int bad_bf = 0, bad_h = 0;
  for (int i = 0; i < N; i++) {
    unsigned got_bf = bf[i / 2] >> (16 * (i & 1)) & 0xffffu;
    unsigned got_h = h[i / 2] >> (16 * (i & 1)) & 0xffffu;
    unsigned want_bf = isnan(in[i]) ? 0x7fffu : ref_f2bf(in[i]);
    bad_bf += got_bf != want_bf;
    /* f16: the prelude's cm_f2h (tested against the fields in test_cuda_emu_shim), but a NaN
     * is the canonical 0x7fff */
    bad_h += got_h != (isnan(in[i]) ? 0x7fffu : h1[i]);
  }
  CHECK_MSG(bad_bf == 0, "%d of %d floats packed to bf16 wrong", bad_bf, N);
  CHECK_MSG(bad_h == 0, "%d of %d floats packed to f16 wrong", bad_h, N);
}

/* an mma fed by ldmatrix equals the scalar product (eighths: exact in f32), B either layout */
static void test_mma_from_ldmatrix(emu_mod *m) {
  test_rng rng = {5};
  float Af[256], Bf[128], C[128], D[128];
  unsigned short A[256], B[128], Bt[128];
  for (int i = 0; i < 256; i++) {
    Af[i] = (float)test_int(&rng, -64, 64) / 8;
    A[i] = (unsigned short)ref_f2bf(Af[i]);
  }
  for (int k = 0; k < 16; k++)
    for (int n = 0; n < 8; n++) {
      Bf[k * 8 + n] = (float)test_int(&rng, -64, 64) / 8;
      B[k * 8 + n] = Bt[n * 16 + k] = (unsigned short)ref_f2bf(Bf[k * 8 + n]);
    }
  for (int i = 0; i < 128; i++) C[i] = (float)test_int(&rng, -512, 512) / 64;
  for (int bt = 0; bt < 2; bt++) {
    void *args[] = {&(const unsigned short *){A}, &(const unsigned short *){bt ? Bt : B},
                    &(const int *){&bt}, &(const float *){C}, &(float *){D}};
    CHECK(mod_run(m, "mma_ldm", 1, 32, args) == 0);
    int bad = 0;
    for (int r = 0; r < 16; r++)
      for (int c = 0; c < 8; c++) {
        double want = C[r * 8 + c];
        for (int k = 0; k < 16; k++) want += (double)Af[r * 16 + k] * Bf[k * 8 + c];
        bad += D[r * 8 + c] != want;
      }
    CHECK_MSG(bad == 0, "B %s: %d of 128 results differ from the scalar product",
              bt ? "[n][k]" : "[k][n] (.trans)", bad);
  }
}

static void test_helpers(void) {
  emu_mod m;
  if (!build_with_prelude(K_HELPERS, &m)) return;
  test_ldmatrix(&m);
  test_cp_async(&m);
  test_pack(&m);
  test_mma_from_ldmatrix(&m);
  mod_free(&m);
}

/* ---- the template on the emulated device ---------------------------------------------- */

static double cpu_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

typedef struct gemm_case {
  int64_t batch, M, N, K;
  bool ta, tb;     /* matmul's transpose_a / transpose_b */
  bool f32_inputs; /* f32 inputs cast to bf16 (a prologue), else bf16 inputs */
  bool epilogue;   /* + bias, GELU, cast to f32 */
} gemm_case;

/* What the template's plans for the program's GEMM stages chose (summed over cases). */
static struct {
  int gemms, async_operands, prologue_operands, split, outer_k, batched, k_parts;
} seen;

static void note_plans(const cm_program *pr) {
  const cm_kprogram *kp = cm_program_kernels(pr);
  for (int i = 0; kp && i < kp->n_kernels; i++)
    for (int s = 0; s < kp->kernels[i].n_stages; s++) {
      const cm_kcuda_plan *p = &kp->kernels[i].stages[s].cuda;
      if (p->kind != CM_KCUDA_GEMM || !p->gemm.mma) continue;
      seen.gemms++;
      seen.k_parts += strstr(kp->kernels[i].stages[s].name, "_kpart") != NULL;
      seen.async_operands += p->gemm.a_async + p->gemm.b_async;
      seen.prologue_operands += !p->gemm.a_async + !p->gemm.b_async;
      seen.split += p->gemm.split_k > 1;
      seen.outer_k += p->gemm.a_outer_k + p->gemm.b_outer_k;
      seen.batched += p->gemm.batch > 1;
    }
}

/* Adds case gc to g (inputs named by tag) and makes its result an output. */
static void add_case(cm_graph *g, const gemm_case *gc, int tag) {
  int nb = gc->batch > 1;
  int64_t ad[3], bd[3];
  if (nb) ad[0] = bd[0] = gc->batch;
  ad[nb] = gc->ta ? gc->K : gc->M;
  ad[nb + 1] = gc->ta ? gc->M : gc->K;
  bd[nb] = gc->tb ? gc->N : gc->K;
  bd[nb + 1] = gc->tb ? gc->K : gc->N;
  cm_dtype in = gc->f32_inputs ? CM_F32 : CM_BF16;
  char an[16], bn[16], biasn[16];
  snprintf(an, sizeof an, "a%d", tag);
  snprintf(bn, sizeof bn, "b%d", tag);
  snprintf(biasn, sizeof biasn, "bias%d", tag);
  int a = cm_input(g, an, in, 2 + nb, ad), b = cm_input(g, bn, in, 2 + nb, bd);
  if (gc->f32_inputs) {
    a = cm_cast(g, a, CM_BF16, NULL);
    b = cm_cast(g, b, CM_BF16, NULL);
  }
  int c = cm_matmul(g, a, b, gc->ta, gc->tb, NULL);
  if (gc->epilogue) {
    int64_t nd[1] = {gc->N};
    int bias = cm_input(g, biasn, CM_F32, 1, nd);
    c = cm_binary_bcast(g, CM_OP_ADD, cm_cast(g, c, CM_F32, NULL), bias, NULL);
    c = cm_nn_gelu(g, c);
  }
  cm_err err = {0};
  CHECK_MSG(cm_graph_error(g) == NULL && cm_graph_add_output(g, c, &err) == CM_OK, "%s %s",
            cm_graph_error(g) ? cm_graph_error(g) : "", err.msg);
}

static void case_name(const gemm_case *gc, char *what, size_t n) {
  snprintf(what, n, "%lldx%lldx%lld batch %lld%s%s%s%s", (long long)gc->M, (long long)gc->N,
           (long long)gc->K, (long long)gc->batch, gc->ta ? " A^T" : "", gc->tb ? " B^T" : "",
           gc->f32_inputs ? " (cast prologue)" : " (bf16 inputs)",
           gc->epilogue ? " + bias, GELU" : "");
}

/* Every case in one program (its modules compiled in parallel) on the emulated device, each
 * output within the oracle's bound. */
static void run_cases(const gemm_case *cases, int n) {
  cm_graph *g = cm_graph_new();
  for (int i = 0; i < n; i++) add_case(g, &cases[i], i);
  test_rng r = {77};
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t), *v = calloc((size_t)g->n_nodes, sizeof *v),
            *bnd = calloc((size_t)g->n_nodes, sizeof *bnd),
            *out = calloc((size_t)g->n_outputs + 1, sizeof *out);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  test_fill_sources(&r, g, t, src);
  cm_err err = {0};
  CHECK_MSG(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK, "oracle: %s", err.msg);
  cm_target tg;
  CHECK(cm_target_cuda("sm_80", &tg, &err) == CM_OK);
  cm_cuda_backend_opts bo = {emu_driver(), emu_compiler(), 0, CM_CUDA_GRAPHS_OFF, 0};
  cm_compile_opts co = {.cache_dir = "", .backend_opts = &bo};
  cm_program *pr = NULL;
  cm_status st = cm_compile(g, &tg, &co, &pr, &err);
  double t0 = cpu_s();
  if (st == CM_OK) st = cm_program_run(pr, (cm_tensor **)src, out, &err);
  double ran = cpu_s() - t0;
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  for (int i = 0; st == CM_OK && i < n; i++) {
    char what[128];
    case_name(&cases[i], what, sizeof what);
    int node = g->outputs[i];
    test_bounded b = test_check_bounded(&out[i], &v[node], &bnd[node]);
    CHECK_MSG(b.ratio <= 1, "%s: |gpu - f64| = %g at [%lld] exceeds its bound %g", what, b.diff,
              (long long)b.at, b.bound);
    fprintf(stderr, "  %-52s worst |gpu - f64| / bound %.3f\n", what, b.ratio);
  }
  if (st == CM_OK) note_plans(pr);
  fprintf(stderr, "  the program ran in %.2f s CPU on the emulated device\n", ran);
  cm_program_free(pr);
  for (int i = 0; i < g->n_nodes; i++) {
    cm_tensor_free(&t[i]);
    cm_tensor_free(&v[i]);
    cm_tensor_free(&bnd[i]);
  }
  for (int i = 0; i < g->n_outputs; i++) cm_tensor_free(&out[i]);
  free(t);
  free(v);
  free(bnd);
  free(out);
  free(src);
  cm_graph_free(g);
}

static void test_template(void) {
  static const gemm_case cases[] = {
      {1, 1, 1, 1, false, false, false, false},
      {1, 7, 13, 5, false, false, true, false},
      {1, 97, 31, 129, false, true, false, true},
      {1, 97, 31, 128, false, true, false, false}, /* B^T rows of 128: cp.async */
      {1, 130, 260, 300, true, false, true, true},
      {1, 64, 40, 96, true, false, false, false}, /* A^T [K][M], M % 8 == 0: cp.async, [k][m] */
      {1, 72, 48, 64, false, false, false, true}, /* B [K][N]: cp.async, [k][n] */
      {3, 33, 17, 40, false, true, false, false}, /* batched, attention-shaped */
      {2, 65, 24, 16, true, true, true, false},
      {1, 64, 64, 1024, false, true, false, false}, /* few blocks, long K: split-K in blocks */
      /* a weight gradient's shape (Xt dY): K split by the lowering, partial sums in scratch */
      {1, 40, 24, 4096, true, false, false, true},
  };
  int n = (int)(sizeof cases / sizeof *cases);
  memset(&seen, 0, sizeof seen);
  run_cases(cases, n);
  fprintf(stderr,
          "  %d tensor-core GEMM stages: %d operands by cp.async, %d by prologue, %d split-K, "
          "%d k-outer tiles, %d batched, %d partial sums of a K split\n",
          seen.gemms, seen.async_operands, seen.prologue_operands, seen.split, seen.outer_k,
          seen.batched, seen.k_parts);
  /* every path of the template ran */
  CHECK(seen.gemms >= n);
  CHECK(seen.async_operands > 0 && seen.prologue_operands > 0 && seen.split > 0 &&
        seen.outer_k > 0 && seen.batched > 0 && seen.k_parts > 0);
}

/* ---- tunable plan fields ---------------------------------------------------------------- */

/* The GEMM kernel of program pr with its stage-0 plan changed by tweak (then refit), rendered,
 * built and run under the shim on buffers of its own; the output (node out of graph g) within
 * the oracle's bound v/bnd. Returns false when the refit refused the plan. */
static bool run_tuned(const cm_program *pr, const cm_graph *g, const cm_tensor *const *src, int out,
                      const cm_tensor *v, const cm_tensor *bnd, const char *what,
                      void (*tweak)(cm_kcuda_gemm *)) {
  const cm_kprogram *kp = cm_program_kernels(pr);
  const cm_graph *pg = cm_program_graph(pr);
  CHECK(kp && kp->n_kernels == 1);
  if (!kp || kp->n_kernels != 1) return false;
  cm_kernel k = kp->kernels[0]; /* a shallow copy whose stage array is our own */
  cm_kstage *stages = malloc(sizeof *stages * (size_t)k.n_stages);
  memcpy(stages, k.stages, sizeof *stages * (size_t)k.n_stages);
  k.stages = stages;
  cm_target t;
  cm_err err = {0};
  CHECK(cm_target_cuda("sm_80", &t, &err) == CM_OK);
  CHECK(stages[0].cuda.kind == CM_KCUDA_GEMM && stages[0].cuda.gemm.mma);
  tweak(&stages[0].cuda.gemm);
  bool refit = cm_cuda_plan_refit(&k, 0, &t, &err) == CM_OK;
  char *text = NULL;
  size_t size = 0;
  FILE *f = open_memstream(&text, &size);
  cm_kcuda_plan_print(&stages[0].cuda, f);
  fclose(f);
  fprintf(stderr, "  %s: %s", what, refit ? text : err.msg);
  if (!refit) fputc('\n', stderr);
  free(text);
  char *csrc = NULL;
  emu_mod m;
  bool built =
      refit && cm_cuda_module_source(&k, &t, false, &csrc, &err) == CM_OK && mod_build(csrc, &m);
  CHECK_MSG(!refit || built, "%s: %s", what, err.msg);
  free(csrc);
  if (!built) {
    free(stages);
    return refit;
  }
  void **bufs = calloc((size_t)k.n_buffers, sizeof *bufs),
       **args = calloc((size_t)k.n_buffers, sizeof *args);
  int out_buf = -1;
  for (int bi = 0; bi < k.n_buffers; bi++) {
    const cm_kbuffer *kb = &k.buffers[bi];
    size_t es = cm_dtype_size(kb->dtype);
    bufs[bi] = kb->kind == CM_KBUF_CONST
                   ? cm_kernel_const_data(pg, kb, &err)
                   : aligned_alloc(64, ((size_t)kb->numel * es + 64) / 64 * 64);
    args[bi] = &bufs[bi];
    if (kb->kind != CM_KBUF_CONST) memset(bufs[bi], 0, ((size_t)kb->numel * es + 64) / 64 * 64);
    int node = kb->node >= 0 ? cm_graph_find(g, pg->nodes[kb->node].name) : -1;
    if (node >= 0 && src[node]) memcpy(bufs[bi], src[node]->data, (size_t)kb->numel * es);
    if (node == out) out_buf = bi;
  }
  CHECK(out_buf >= 0);
  cm_cuda_render_opts ro = {&t, false};
  for (int st = 0; st < k.n_stages; st++) {
    cm_cuda_launch l = cm_cuda_stage_launch(&k, st, &ro);
    char fn[32];
    snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, st);
    CHECK(m.launch(fn, l.grid, l.block, l.shared_bytes, args) == 0);
  }
  if (out_buf >= 0) {
    cm_tensor got = {0};
    cm_type gt = v[out].type; /* the oracle's values are f64: the output's shape in its dtype */
    gt.dtype = k.buffers[out_buf].dtype;
    CHECK(cm_tensor_alloc(&got, gt, NULL) == CM_OK);
    memcpy(got.data, bufs[out_buf], cm_type_nbytes(&got.type));
    test_bounded b = test_check_bounded(&got, &v[out], &bnd[out]);
    CHECK_MSG(b.ratio <= 1, "%s: |gpu - f64| = %g at [%lld] exceeds its bound %g", what, b.diff,
              (long long)b.at, b.bound);
    cm_tensor_free(&got);
  }
  for (int bi = 0; bi < k.n_buffers; bi++) free(bufs[bi]);
  free(bufs);
  free(args);
  mod_free(&m);
  free(stages);
  return true;
}

static void tweak_none(cm_kcuda_gemm *p) {
  (void)p;
}
static void tweak_padded(cm_kcuda_gemm *p) {
  p->swizzle = false;
  p->stages = 3;
}
static void tweak_deep_k(cm_kcuda_gemm *p) {
  p->kc = 64;
  p->stages = 2;
  p->split_k = 4;
}
static void tweak_narrow_warps(cm_kcuda_gemm *p) {
  p->warps_m = 1;
  p->warps_n = 2;
  p->mr = 32;
  p->nr = 16;
  p->split_k = 2;
}
static void tweak_registers(cm_kcuda_gemm *p) {
  p->a_async = p->b_async = false;
  p->warps_m = 4;
  p->warps_n = 1;
  p->mr = 16;
  p->nr = 64;
}
static void tweak_bad(cm_kcuda_gemm *p) {
  p->mr = 24;
}

/* One GEMM (97 x 40 x 136, A bf16 by cp.async, B^T cast from f32 in the prologue) lowered once,
 * then rendered and run with each tuner's change of its plan: every valid one within the
 * oracle's bound, an invalid one refused. */
static void test_tunables(void) {
  cm_graph *g = cm_graph_new();
  int64_t ad[2] = {97, 136}, bd[2] = {40, 136};
  int a = cm_input(g, "a", CM_BF16, 2, ad), b = cm_input(g, "b", CM_F32, 2, bd);
  int c = cm_matmul(g, a, cm_cast(g, b, CM_BF16, "b16"), false, true, "c");
  cm_err err = {0};
  CHECK(cm_graph_add_output(g, c, &err) == CM_OK);
  test_rng r = {99};
  cm_tensor *t = calloc((size_t)g->n_nodes, sizeof *t), *v = calloc((size_t)g->n_nodes, sizeof *v),
            *bnd = calloc((size_t)g->n_nodes, sizeof *bnd);
  const cm_tensor **src = calloc((size_t)g->n_nodes, sizeof *src);
  test_fill_sources(&r, g, t, src);
  CHECK(cm_eval_bounded(g, src, v, bnd, &err) == CM_OK);
  cm_target tg;
  CHECK(cm_target_cuda("sm_80", &tg, &err) == CM_OK);
  cm_compile_opts co = {.compile_only = true, .render_only = true};
  cm_program *pr = NULL;
  CHECK_MSG(cm_compile(g, &tg, &co, &pr, &err) == CM_OK, "%s", err.msg);
  if (pr) {
    static const struct {
      const char *what;
      void (*tweak)(cm_kcuda_gemm *);
    } tunings[] = {{"default", tweak_none},
                   {"padded rows, 3 stages", tweak_padded},
                   {"k 64, 2 stages, split 4", tweak_deep_k},
                   {"1x2 warps of 32x16, split 2", tweak_narrow_warps},
                   {"both operands through registers, 4x1 warps of 16x64", tweak_registers}};
    for (size_t i = 0; i < sizeof tunings / sizeof *tunings; i++)
      CHECK_MSG(run_tuned(pr, g, src, c, v, bnd, tunings[i].what, tunings[i].tweak), "%s refused",
                tunings[i].what);
    CHECK(!run_tuned(pr, g, src, c, v, bnd, "warp tile 24 rows", tweak_bad));
  }
  cm_program_free(pr);
  for (int i = 0; i < g->n_nodes; i++) {
    cm_tensor_free(&t[i]);
    cm_tensor_free(&v[i]);
    cm_tensor_free(&bnd[i]);
  }
  free(t);
  free(v);
  free(bnd);
  free(src);
  cm_graph_free(g);
}

TEST_MAIN(TEST(test_helpers), TEST(test_template), TEST(test_tunables))
