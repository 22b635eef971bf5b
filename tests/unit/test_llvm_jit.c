/* tests/unit/test_llvm_jit.c — the LLVM JIT (codegen/llvm_jit.c): host target, O3 compile and
 * AVX-512 vectorization of an axpy loop built with the LLVM C API, lookups and their errors,
 * invalid modules, the object cache (hit/miss, key components, corrupted files), and CPUs named
 * by CMAEC_CPU (codegen/target.c: vector width, cache key, unknown names, compile only). */
#include "codegen/codegen.h"
#include "tests/test.h"
#include "tests/testlib.h"
#include "tests/tensor_compare.h"

#include <dirent.h>
#include <llvm-c/Core.h>
#include <llvm-c/TargetMachine.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- test kernels built with the LLVM C API ------------------------------------ */

/* void axpy(float *y, const float *x, float a, int64_t n) { for i < n: y[i] += a * x[i]; } */
static LLVMModuleRef build_axpy(LLVMContextRef ctx, const char *fn_name) {
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("axpy_module", ctx);
  LLVMTypeRef f32 = LLVMFloatTypeInContext(ctx), i64 = LLVMInt64TypeInContext(ctx);
  LLVMTypeRef ptr = LLVMPointerTypeInContext(ctx, 0);
  LLVMTypeRef params[4] = {ptr, ptr, f32, i64};
  LLVMTypeRef fty = LLVMFunctionType(LLVMVoidTypeInContext(ctx), params, 4, 0);
  LLVMValueRef fn = LLVMAddFunction(m, fn_name, fty);
  LLVMValueRef y = LLVMGetParam(fn, 0), x = LLVMGetParam(fn, 1), a = LLVMGetParam(fn, 2),
               n = LLVMGetParam(fn, 3);
  LLVMBasicBlockRef entry = LLVMAppendBasicBlockInContext(ctx, fn, "entry");
  LLVMBasicBlockRef loop = LLVMAppendBasicBlockInContext(ctx, fn, "loop");
  LLVMBasicBlockRef exit = LLVMAppendBasicBlockInContext(ctx, fn, "exit");
  LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
  LLVMPositionBuilderAtEnd(b, entry);
  LLVMValueRef zero = LLVMConstInt(i64, 0, 0);
  LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSGT, n, zero, "nonempty"), loop, exit);
  LLVMPositionBuilderAtEnd(b, loop);
  LLVMValueRef i = LLVMBuildPhi(b, i64, "i");
  LLVMValueRef py = LLVMBuildGEP2(b, f32, y, &i, 1, "py");
  LLVMValueRef px = LLVMBuildGEP2(b, f32, x, &i, 1, "px");
  LLVMValueRef vx = LLVMBuildLoad2(b, f32, px, "vx");
  LLVMValueRef vy = LLVMBuildLoad2(b, f32, py, "vy");
  LLVMValueRef s = LLVMBuildFAdd(b, vy, LLVMBuildFMul(b, a, vx, "ax"), "s");
  LLVMBuildStore(b, s, py);
  LLVMValueRef next = LLVMBuildNSWAdd(b, i, LLVMConstInt(i64, 1, 0), "next");
  LLVMBuildCondBr(b, LLVMBuildICmp(b, LLVMIntSLT, next, n, "more"), loop, exit);
  LLVMValueRef in_vals[2] = {zero, next};
  LLVMBasicBlockRef in_blocks[2] = {entry, loop};
  LLVMAddIncoming(i, in_vals, in_blocks, 2);
  LLVMPositionBuilderAtEnd(b, exit);
  LLVMBuildRetVoid(b);
  LLVMDisposeBuilder(b);
  return m;
}

/* int32_t NAME(void) { return value; } */
static LLVMModuleRef build_const(LLVMContextRef ctx, const char *fn_name, int value) {
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("const_module", ctx);
  LLVMTypeRef i32 = LLVMInt32TypeInContext(ctx);
  LLVMValueRef fn = LLVMAddFunction(m, fn_name, LLVMFunctionType(i32, NULL, 0, 0));
  LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
  LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(ctx, fn, "entry"));
  LLVMBuildRet(b, LLVMConstInt(i32, (unsigned long long)value, 1));
  LLVMDisposeBuilder(b);
  return m;
}

/* float NAME(float v) { return expf(v); } — calls into the process's libm. */
static LLVMModuleRef build_call_expf(LLVMContextRef ctx, const char *fn_name) {
  LLVMModuleRef m = LLVMModuleCreateWithNameInContext("expf_module", ctx);
  LLVMTypeRef f32 = LLVMFloatTypeInContext(ctx);
  LLVMTypeRef fty = LLVMFunctionType(f32, &f32, 1, 0);
  LLVMValueRef callee = LLVMAddFunction(m, "expf", fty);
  LLVMValueRef fn = LLVMAddFunction(m, fn_name, fty);
  LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
  LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(ctx, fn, "entry"));
  LLVMValueRef arg = LLVMGetParam(fn, 0);
  LLVMBuildRet(b, LLVMBuildCall2(b, fty, callee, &arg, 1, "e"));
  LLVMDisposeBuilder(b);
  return m;
}

/* clang's -fsanitize=function checks a signature word in front of every function called through a
 * pointer; JIT'd code has none, so calls into it are made from functions that skip the check. */

typedef void (*axpy_fn)(float *, const float *, float, int64_t);
typedef int32_t (*const_fn)(void);
typedef float (*unary_fn)(float);

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static test_rng rng_state = {0x9e3779b97f4a7c15u};
static float rand_float(void) {
  return (float)(test_u32(&rng_state) >> 8) / (float)0x1000000 * 2.0f - 1.0f;
}

/* Runs the JIT'd axpy on n random values: y + a x within the forward error bound
 * of that graph (cm_eval_bounded: with or without FMA), nothing written past
 * the end. Returns the number of failures (0 or 1 per kind). */
CM_NO_SANITIZE_FUNCTION static void call_axpy(axpy_fn f, float *y, const float *x, float a,
                                              int64_t n) {
  f(y, x, a, n);
}
CM_NO_SANITIZE_FUNCTION static int32_t call_const(const_fn f) {
  return f();
}
CM_NO_SANITIZE_FUNCTION static float call_unary(unary_fn f, float v) {
  return f(v);
}

static int check_axpy(axpy_fn f, int64_t n) {
  float *x = malloc((size_t)(n + 1) * sizeof *x), *y = malloc((size_t)(n + 1) * sizeof *y);
  float *y0 = malloc((size_t)(n + 1) * sizeof *y0);
  const float a = 0.75f;
  for (int64_t i = 0; i <= n; i++) {
    x[i] = rand_float();
    y[i] = y0[i] = rand_float();
  }
  const float sentinel = y[n];
  call_axpy(f, y, x, a, n);
  int bad = y[n] != sentinel; /* wrote past the end */
  if (n == 0) {               /* nothing else to check (a graph has no empty tensors) */
    free(x), free(y), free(y0);
    return bad;
  }
  cm_graph *g = cm_graph_new();
  int gx = cm_input(g, "x", CM_F32, 1, &n), gy = cm_input(g, "y", CM_F32, 1, &n);
  int out = cm_binary(g, CM_OP_ADD, gy,
                      cm_binary(g, CM_OP_MUL, cm_const_fill(g, NULL, CM_F32, 1, &n, a), gx, NULL),
                      "y_new");
  cm_type t = g->nodes[gx].type;
  cm_tensor tx = test_view(t, x), ty = test_view(t, y0), got = test_view(t, y);
  const cm_tensor **src = calloc((size_t)g->n_nodes + 1, sizeof *src);
  src[gx] = &tx, src[gy] = &ty;
  test_oracle o = {0};
  cm_err err = {0};
  if (cm_graph_error(g) || test_oracle_eval(&o, g, src, &err) != CM_OK) {
    fprintf(stderr, "  axpy oracle: %s%s\n", cm_graph_error(g) ? cm_graph_error(g) : "", err.msg);
    bad++;
  } else {
    test_bounded r = test_oracle_check(&o, out, &got, "axpy");
    if (!(r.ratio <= 1)) {
      fprintf(stderr, "  axpy n = %lld: |y - f64| = %g at [%lld] exceeds its error bound %g\n",
              (long long)n, r.diff, (long long)r.at, r.bound);
      bad++;
    }
  }
  test_oracle_free(&o);
  free(src);
  cm_graph_free(g);
  free(x);
  free(y);
  free(y0);
  return bad;
}

/* ---- tests -------------------------------------------------------------------------- */

static void test_create_and_description(void) {
  cm_jit *j = NULL;
  cm_err err = {0};
  CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
  if (!j) return;
  const char *d = cm_jit_target_description(j);
  char *cpu = LLVMGetHostCPUName();
  CHECK_STR_CONTAINS(d, cpu);
  LLVMDisposeMessage(cpu);
  CHECK_STR_CONTAINS(d, " O3");
#if defined(__x86_64__)
  CHECK_MSG(strncmp(d, "x86_64", 6) == 0, "description \"%s\"", d);
  CHECK_STR_CONTAINS(d, "+sse2");
#endif
  CHECK(strstr(d, ",-") == NULL); /* only enabled features are listed */
  CHECK(cm_jit_context(j) != NULL);
  cm_jit_stats s;
  cm_jit_get_stats(j, &s);
  CHECK(s.modules == 0 && s.cache_hits == 0 && s.cache_misses == 0);
  fprintf(stderr, "  target: %.160s...\n", d);
  cm_jit_destroy(j);

  cm_jit_opts bad = {NULL, 4, NULL, NULL, 0, false};
  CHECK(cm_jit_create(&j, &bad, &err) == CM_EINVALID);
  CHECK(j == NULL);
  CHECK_STR_CONTAINS(err.msg, "opt_level 4");
  cm_jit_opts width = {NULL, 3, NULL, NULL, 128, false};
  CHECK(cm_jit_create(&j, &width, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "vector_width 128");
  cm_jit_opts empty = {"", 3, NULL, NULL, 0, false};
  CHECK(cm_jit_create(&j, &empty, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "cache_dir");
  cm_jit_opts under_file = {"/proc/self/status/cache", 3, NULL, NULL, 0, false};
  CHECK(cm_jit_create(&j, &under_file, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "/proc/self/status/cache");
  CHECK(j == NULL);
}

static void test_axpy_o3_vectorized(void) {
  cm_jit *j = NULL;
  cm_err err = {0};
  CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
  if (!j) return;
  /* Assembly of the same kernel: O3 vectorizes the loop; with AVX-512 it uses zmm registers. */
  LLVMModuleRef m = build_axpy(cm_jit_context(j), "axpy");
  char *asm_text = NULL, *ir_text = NULL;
  CHECK(cm_jit_render(j, m, CM_JIT_TEXT_ASM, &asm_text, &err) == CM_OK);
  LLVMDisposeModule(m);
  m = build_axpy(cm_jit_context(j), "axpy");
  CHECK(cm_jit_render(j, m, CM_JIT_TEXT_IR, &ir_text, &err) == CM_OK);
  LLVMDisposeModule(m);
  if (asm_text && ir_text) {
    CHECK_STR_CONTAINS(asm_text, "axpy:");
    CHECK_STR_CONTAINS(ir_text, "fmul <"); /* vectorized */
    if (strstr(cm_jit_target_description(j), "+avx512f")) {
      CHECK_STR_CONTAINS(cm_jit_target_description(j), " vec512");
      CHECK_STR_CONTAINS(ir_text, "<16 x float>");
      CHECK_STR_CONTAINS(asm_text, "%zmm");
    } else {
      CHECK_STR_CONTAINS(asm_text, "%ymm");
    }
  }
  free(asm_text);
  free(ir_text);

  CHECK(cm_jit_add_module(j, build_axpy(cm_jit_context(j), "axpy"), &err) == CM_OK);
  void *addr = NULL;
  CHECK(cm_jit_lookup(j, "axpy", &addr, &err) == CM_OK);
  if (addr) {
    axpy_fn f;
    memcpy(&f, &addr, sizeof f);
    const int64_t sizes[] = {0, 1, 7, 16, 17, 1000, 1037, 65536 + 3};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++)
      CHECK_MSG(check_axpy(f, sizes[k]) == 0, "n = %lld", (long long)sizes[k]);
    test_tally_report("axpy");
  }
  cm_jit_stats s;
  cm_jit_get_stats(j, &s);
  CHECK(s.modules == 1);
  CHECK(s.cache_hits == 0 && s.cache_misses == 0); /* no cache configured */
  CHECK(s.compile_ms > 0);
  cm_jit_destroy(j);

  /* vector_width 256: the same loop with 256-bit vectors only. */
  cm_jit_opts o256 = {NULL, 3, NULL, NULL, 256, false};
  CHECK(cm_jit_create(&j, &o256, &err) == CM_OK);
  if (!j) return;
  CHECK(strstr(cm_jit_target_description(j), "vec512") == NULL);
  m = build_axpy(cm_jit_context(j), "axpy");
  CHECK(cm_jit_render(j, m, CM_JIT_TEXT_ASM, &asm_text, &err) == CM_OK);
  LLVMDisposeModule(m);
  if (asm_text) {
    CHECK(strstr(asm_text, "%zmm") == NULL);
    CHECK_STR_CONTAINS(asm_text, "%ymm");
  }
  free(asm_text);
  cm_jit_destroy(j);
}

static void test_other_context_and_levels(void) {
  /* A module from the caller's own context, at every optimization level. */
  LLVMContextRef ctx = LLVMContextCreate();
  for (int level = 0; level <= 3; level++) {
    cm_jit_opts o = {NULL, level, NULL, NULL, 0, false};
    cm_jit *j = NULL;
    cm_err err = {0};
    CHECK(cm_jit_create(&j, &o, &err) == CM_OK);
    if (!j) continue;
    char want[8];
    snprintf(want, sizeof want, " O%d", level);
    CHECK_STR_CONTAINS(cm_jit_target_description(j), want);
    CHECK(cm_jit_add_module(j, build_axpy(ctx, "axpy_ctx"), &err) == CM_OK);
    void *addr = NULL;
    CHECK(cm_jit_lookup(j, "axpy_ctx", &addr, &err) == CM_OK);
    if (addr) {
      axpy_fn f;
      memcpy(&f, &addr, sizeof f);
      CHECK_MSG(check_axpy(f, 333) == 0, "O%d", level);
    }
    cm_jit_destroy(j);
  }
  LLVMContextDispose(ctx);
}

static void test_lookup_and_errors(void) {
  cm_jit *j = NULL;
  cm_err err = {0};
  CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
  if (!j) return;
  LLVMContextRef ctx = cm_jit_context(j);
  CHECK(cm_jit_add_module(j, build_const(ctx, "answer", 42), &err) == CM_OK);
  CHECK(cm_jit_add_module(j, build_call_expf(ctx, "my_exp"), &err) == CM_OK);
  void *addr = NULL;
  CHECK(cm_jit_lookup(j, "answer", &addr, &err) == CM_OK);
  if (addr) {
    const_fn f;
    memcpy(&f, &addr, sizeof f);
    CHECK(call_const(f) == 42);
  }
  addr = NULL;
  CHECK(cm_jit_lookup(j, "my_exp", &addr, &err) == CM_OK); /* expf resolved from the process */
  if (addr) {
    unary_fn f;
    memcpy(&f, &addr, sizeof f);
    CHECK_NEAR(call_unary(f, 1.0f), expf(1.0f), 1e-7);
  }

  /* Unknown symbol: an error naming it, one line, and no address. */
  addr = &err;
  memset(&err, 0, sizeof err);
  CHECK(cm_jit_lookup(j, "no_such_kernel", &addr, &err) == CM_EINVALID);
  CHECK(addr == NULL);
  CHECK_STR_CONTAINS(err.msg, "no_such_kernel");
  CHECK_STR_CONTAINS(err.msg, "not found");
  CHECK(strchr(err.msg, '\n') == NULL);

  /* The same symbol defined twice: the second add fails and names it; the first still works. */
  memset(&err, 0, sizeof err);
  CHECK(cm_jit_add_module(j, build_const(ctx, "answer", 43), &err) != CM_OK);
  CHECK_STR_CONTAINS(err.msg, "answer");
  addr = NULL;
  CHECK(cm_jit_lookup(j, "answer", &addr, &err) == CM_OK);
  if (addr) {
    const_fn f;
    memcpy(&f, &addr, sizeof f);
    CHECK(call_const(f) == 42);
  }

  /* Invalid IR (a block without a terminator) is rejected by the verifier, naming the module. */
  LLVMModuleRef bad = LLVMModuleCreateWithNameInContext("broken_module", ctx);
  LLVMValueRef fn =
      LLVMAddFunction(bad, "broken", LLVMFunctionType(LLVMVoidTypeInContext(ctx), NULL, 0, 0));
  LLVMAppendBasicBlockInContext(ctx, fn, "entry");
  memset(&err, 0, sizeof err);
  CHECK(cm_jit_add_module(j, bad, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "broken_module");
  CHECK_STR_CONTAINS(err.msg, "not valid LLVM IR");
  CHECK(strchr(err.msg, '\n') == NULL);

  /* A call to a function that exists nowhere: the add succeeds, the lookup (link) fails. */
  LLVMModuleRef undef = LLVMModuleCreateWithNameInContext("undef_module", ctx);
  LLVMTypeRef vfty = LLVMFunctionType(LLVMVoidTypeInContext(ctx), NULL, 0, 0);
  LLVMValueRef missing = LLVMAddFunction(undef, "cm_test_missing_function_xyz", vfty);
  LLVMValueRef caller = LLVMAddFunction(undef, "calls_missing", vfty);
  LLVMBuilderRef b = LLVMCreateBuilderInContext(ctx);
  LLVMPositionBuilderAtEnd(b, LLVMAppendBasicBlockInContext(ctx, caller, "entry"));
  LLVMBuildCall2(b, vfty, missing, NULL, 0, "");
  LLVMBuildRetVoid(b);
  LLVMDisposeBuilder(b);
  CHECK(cm_jit_add_module(j, undef, &err) == CM_OK);
  memset(&err, 0, sizeof err);
  CHECK(cm_jit_lookup(j, "calls_missing", &addr, &err) != CM_OK);
  CHECK_STR_CONTAINS(err.msg, "cm_test_missing_function_xyz");

  cm_jit_stats s;
  cm_jit_get_stats(j, &s);
  CHECK(s.modules == 3); /* answer, my_exp, undef_module; not the duplicate or the broken one */
  CHECK(cm_jit_add_module(j, NULL, &err) == CM_EINVALID);
  CHECK(cm_jit_lookup(j, NULL, &addr, &err) == CM_EINVALID);
  cm_jit_destroy(j);
}

static void test_cache_key_components(void) {
  char base[65], k[65];
  cm_jit_cache_key("define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver5",
                   "+avx512f", 3, base);
  CHECK(strlen(base) == 64);
  CHECK(strspn(base, "0123456789abcdef") == 64);
  cm_jit_cache_key("define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver5",
                   "+avx512f", 3, k);
  CHECK(strcmp(base, k) == 0);
  const char *variants[][5] = {
      {"define void @g() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver5", "+avx512f"},
      {"define void @f() { ret void }", "19.1.6", "x86_64-pc-linux-gnu", "znver5", "+avx512f"},
      {"define void @f() { ret void }", "19.1.7", "aarch64-unknown-linux-gnu", "znver5",
       "+avx512f"},
      {"define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver4", "+avx512f"},
      {"define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver5", "-avx512f"},
      /* field boundaries are length-prefixed: moving a character between fields changes the key */
      {"define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gn", "uznver5", "+avx512f"},
  };
  for (size_t i = 0; i < sizeof variants / sizeof variants[0]; i++) {
    cm_jit_cache_key(variants[i][0], variants[i][1], variants[i][2], variants[i][3], variants[i][4],
                     3, k);
    CHECK_MSG(strcmp(base, k) != 0, "variant %zu has the base key", i);
  }
  cm_jit_cache_key("define void @f() { ret void }", "19.1.7", "x86_64-pc-linux-gnu", "znver5",
                   "+avx512f", 2, k);
  CHECK(strcmp(base, k) != 0);

  /* The JIT's key of a module: stable for the same IR, different for different IR. */
  cm_jit *j = NULL;
  cm_err err = {0};
  CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
  if (!j) return;
  char k1[65], k2[65], k3[65];
  LLVMModuleRef m1 = build_const(cm_jit_context(j), "c", 1),
                m2 = build_const(cm_jit_context(j), "c", 1),
                m3 = build_const(cm_jit_context(j), "c", 2);
  cm_jit_module_key(j, m1, k1);
  cm_jit_module_key(j, m2, k2);
  cm_jit_module_key(j, m3, k3);
  CHECK(strcmp(k1, k2) == 0);
  CHECK(strcmp(k1, k3) != 0);
  LLVMDisposeModule(m1);
  LLVMDisposeModule(m2);
  LLVMDisposeModule(m3);
  cm_jit_destroy(j);
}

/* ---- cache ------------------------------------------------------------------------- */

static char cache_root[256];

static void make_cache_root(void) {
  snprintf(cache_root, sizeof cache_root, "/tmp/cmaec-jit-test-XXXXXX");
  if (!mkdtemp(cache_root)) cache_root[0] = 0;
}

/* Number of entries in dir; *tmp counts temporary files left behind. */
static int count_files(const char *dir, int *tmp) {
  DIR *d = opendir(dir);
  int n = 0;
  *tmp = 0;
  if (!d) return -1;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    n++;
    if (strncmp(e->d_name, ".tmp", 4) == 0) (*tmp)++;
  }
  closedir(d);
  return n;
}

typedef struct {
  int hits, misses, rejected;
} cache_counts;

/* One fresh JIT on the cache: adds the module from build(), runs it, returns the stat deltas. */
static cache_counts run_with_cache(const cm_jit_opts *o, int which, bool *ok) {
  cache_counts c = {0, 0, 0};
  cm_jit *j = NULL;
  cm_err err = {0};
  *ok = false;
  if (cm_jit_create(&j, o, &err) != CM_OK) {
    fprintf(stderr, "  create: %s\n", err.msg);
    return c;
  }
  LLVMContextRef ctx = cm_jit_context(j);
  LLVMModuleRef m = which == 0 ? build_axpy(ctx, "axpy") : build_const(ctx, "answer", which);
  void *addr = NULL;
  if (cm_jit_add_module(j, m, &err) == CM_OK &&
      cm_jit_lookup(j, which == 0 ? "axpy" : "answer", &addr, &err) == CM_OK) {
    if (which == 0) {
      axpy_fn f;
      memcpy(&f, &addr, sizeof f);
      *ok = check_axpy(f, 1001) == 0;
    } else {
      const_fn f;
      memcpy(&f, &addr, sizeof f);
      *ok = call_const(f) == which;
    }
  } else {
    fprintf(stderr, "  jit: %s\n", err.msg);
  }
  cm_jit_stats s;
  cm_jit_get_stats(j, &s);
  c.hits = s.cache_hits;
  c.misses = s.cache_misses;
  c.rejected = s.cache_rejected;
  if (s.cache_hits) CHECK(s.compile_ms == 0); /* a hit compiles nothing */
  CHECK(s.cache_write_failures == 0);
  CHECK_MSG(cm_jit_cache_error(j)[0] == 0, "%s", cm_jit_cache_error(j));
  cm_jit_destroy(j);
  return c;
}

#define EXPECT(o, which, h, m, r)                                                                  \
  do {                                                                                             \
    bool ok_;                                                                                      \
    cache_counts c_ = run_with_cache(o, which, &ok_);                                              \
    CHECK_MSG(ok_, "kernel %d gave wrong results", which);                                         \
    CHECK_MSG(c_.hits == (h) && c_.misses == (m) && c_.rejected == (r),                            \
              "hits %d misses %d rejected %d, want %d %d %d", c_.hits, c_.misses, c_.rejected,     \
              (h), (m), (r));                                                                      \
  } while (0)

/* Path of the only *.cmobj file whose key is that of the axpy module under o. */
static void axpy_cache_file(const cm_jit_opts *o, char *path, size_t n) {
  cm_jit *j = NULL;
  cm_err err = {0};
  path[0] = 0;
  if (cm_jit_create(&j, o, &err)) return;
  LLVMModuleRef m = build_axpy(cm_jit_context(j), "axpy");
  char key[65];
  cm_jit_module_key(j, m, key);
  LLVMDisposeModule(m);
  cm_jit_destroy(j);
  snprintf(path, n, "%s/%s.cmobj", o->cache_dir, key);
}

static long file_size(const char *path) {
  struct stat st;
  return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

static void test_cache_hits_and_misses(void) {
  make_cache_root();
  CHECK(cache_root[0] != 0);
  if (!cache_root[0]) return;
  char dir[512];
  snprintf(dir, sizeof dir, "%s/nested/objects", cache_root); /* created by cm_jit_create */
  cm_jit_opts o3 = {dir, 3, NULL, NULL, 0, false};
  EXPECT(&o3, 0, 0, 1, 0); /* first time: compiled and stored */
  EXPECT(&o3, 0, 1, 0, 0); /* same IR in a new JIT: loaded */
  EXPECT(&o3, 7, 0, 1, 0); /* different IR: compiled */
  EXPECT(&o3, 8, 0, 1, 0); /* different constant, different IR */
  EXPECT(&o3, 7, 1, 0, 0);
  cm_jit_opts o2 = {dir, 2, NULL, NULL, 0, false};
  EXPECT(&o2, 0, 0, 1, 0); /* same IR, another opt level */
  EXPECT(&o2, 0, 1, 0, 0);
  cm_jit_opts v3 = {dir, 3, "x86-64-v3", NULL, 0, false};
  EXPECT(&v3, 0, 0, 1, 0); /* same IR, another CPU */
  cm_jit_opts v3f = {dir, 3, "x86-64-v3", "-fma", 0, false};
  EXPECT(&v3f, 0, 0, 1, 0); /* same IR and CPU, other features */
  EXPECT(&v3f, 0, 1, 0, 0);
  cm_jit_opts w256 = {dir, 3, NULL, NULL, 256, false};
  EXPECT(&w256, 0, 0, 1, 0); /* same IR, host CPU, 256-bit vectors */
  int tmp = 0;
  CHECK(count_files(dir, &tmp) == 7);
  CHECK(tmp == 0);

  /* Two modules in one JIT, one hit and one miss, counted separately. */
  cm_jit *j = NULL;
  cm_err err = {0};
  CHECK(cm_jit_create(&j, &o3, &err) == CM_OK);
  if (j) {
    CHECK(cm_jit_add_module(j, build_axpy(cm_jit_context(j), "axpy"), &err) == CM_OK);
    CHECK(cm_jit_add_module(j, build_const(cm_jit_context(j), "answer", 99), &err) == CM_OK);
    cm_jit_stats s;
    cm_jit_get_stats(j, &s);
    CHECK(s.modules == 2 && s.cache_hits == 1 && s.cache_misses == 1 && s.cache_rejected == 0);
    cm_jit_destroy(j);
  }
  test_remove_tree(cache_root);
}

static void test_cache_corruption(void) {
  make_cache_root();
  CHECK(cache_root[0] != 0);
  if (!cache_root[0]) return;
  cm_jit_opts o = {cache_root, 3, NULL, NULL, 0, false};
  EXPECT(&o, 0, 0, 1, 0);
  char path[600];
  axpy_cache_file(&o, path, sizeof path);
  long size = file_size(path);
  CHECK_MSG(size > 88, "cache file %s: size %ld", path, size);
  if (size <= 88) return;

  /* One flipped bit in the object: the checksum fails, recompiled, rewritten, then a hit. */
  FILE *f = fopen(path, "r+b");
  CHECK(f != NULL);
  if (f) {
    fseek(f, 88 + (size - 88) / 2, SEEK_SET);
    int c = fgetc(f);
    fseek(f, 88 + (size - 88) / 2, SEEK_SET);
    fputc(c ^ 0x10, f);
    fclose(f);
  }
  EXPECT(&o, 0, 0, 1, 1);
  CHECK(file_size(path) == size);
  EXPECT(&o, 0, 1, 0, 0);

  /* Truncated (a crash mid-write elsewhere): size check fails. */
  CHECK(truncate(path, size - 100) == 0);
  EXPECT(&o, 0, 0, 1, 1);
  EXPECT(&o, 0, 1, 0, 0);

  /* Shorter than a header, empty, or a foreign file with garbage where the magic goes. */
  CHECK(truncate(path, 40) == 0);
  EXPECT(&o, 0, 0, 1, 1);
  CHECK(truncate(path, 0) == 0);
  EXPECT(&o, 0, 0, 1, 1);
  f = fopen(path, "r+b");
  if (f) {
    fputs("ELF?", f);
    fclose(f);
  }
  EXPECT(&o, 0, 0, 1, 1);
  EXPECT(&o, 0, 1, 0, 0);

  /* A valid file of another key under this key's name (e.g. copied by hand): the key check. */
  EXPECT(&o, 5, 0, 1, 0);
  char other[600];
  {
    cm_jit *j = NULL;
    cm_err err = {0};
    if (cm_jit_create(&j, &o, &err) == CM_OK) {
      LLVMModuleRef m = build_const(cm_jit_context(j), "answer", 5);
      char key[65];
      cm_jit_module_key(j, m, key);
      LLVMDisposeModule(m);
      snprintf(other, sizeof other, "%s/%s.cmobj", cache_root, key);
      cm_jit_destroy(j);
    } else {
      other[0] = 0;
    }
  }
  CHECK(other[0] && rename(other, path) == 0);
  EXPECT(&o, 0, 0, 1, 1);
  EXPECT(&o, 0, 1, 0, 0);
  int tmp = 0;
  count_files(cache_root, &tmp);
  CHECK(tmp == 0);

  /* A cache directory that went away after create: compiling still works, the failure is
   * counted and explained. */
  {
    char gone[600];
    snprintf(gone, sizeof gone, "%s/gone", cache_root);
    cm_jit_opts og = {gone, 3, NULL, NULL, 0, false};
    cm_jit *j = NULL;
    cm_err err = {0};
    CHECK(cm_jit_create(&j, &og, &err) == CM_OK);
    if (j) {
      CHECK(rmdir(gone) == 0);
      CHECK(cm_jit_add_module(j, build_const(cm_jit_context(j), "answer", 77), &err) == CM_OK);
      void *addr = NULL;
      CHECK(cm_jit_lookup(j, "answer", &addr, &err) == CM_OK);
      if (addr) {
        const_fn fn;
        memcpy(&fn, &addr, sizeof fn);
        CHECK(call_const(fn) == 77);
      }
      cm_jit_stats s;
      cm_jit_get_stats(j, &s);
      CHECK(s.cache_write_failures == 1 && s.cache_misses == 1);
      CHECK_STR_CONTAINS(cm_jit_cache_error(j), gone);
      CHECK_STR_CONTAINS(cm_jit_cache_error(j), "temporary file");
      cm_jit_destroy(j);
    }
  }
  test_remove_tree(cache_root);
}

/* Several processes on one cache at once: every result right, every file whole, no temp files. */
static void test_cache_several_processes(void) {
  make_cache_root();
  CHECK(cache_root[0] != 0);
  if (!cache_root[0]) return;
  cm_jit_opts o = {cache_root, 1, NULL, NULL, 0, false};
  enum { PROCS = 3, KERNELS = 12 };
  pid_t pids[PROCS];
  for (int p = 0; p < PROCS; p++) {
    pids[p] = fork();
    if (pids[p] == 0) {
      int bad = 0;
      for (int k = 1; k <= KERNELS; k++) {
        bool ok;
        run_with_cache(&o, k, &ok);
        bad += !ok;
      }
      _exit(bad || test_failures ? 1 : 0);
    }
    CHECK(pids[p] > 0);
  }
  for (int p = 0; p < PROCS; p++) {
    int status = -1;
    if (pids[p] > 0) waitpid(pids[p], &status, 0);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "process %d: status %d", p, status);
  }
  for (int k = 1; k <= KERNELS; k++) EXPECT(&o, k, 1, 0, 0); /* all stored, all valid */
  int tmp = 0;
  CHECK(count_files(cache_root, &tmp) == KERNELS);
  CHECK(tmp == 0);
  test_remove_tree(cache_root);
}

/* Fresh O3 compile vs load from the cache for the axpy module (printed; best of 5). */
static void test_cache_timing(void) {
  make_cache_root();
  CHECK(cache_root[0] != 0);
  if (!cache_root[0]) return;
  double best_fresh = 1e30, best_cached = 1e30, best_fresh_compile = 1e30, best_load = 1e30;
  cm_jit_opts o = {cache_root, 3, NULL, NULL, 0, false};
  for (int rep = 0; rep < 5; rep++) {
    for (int pass = 0; pass < 2; pass++) {
      if (pass == 0) { /* empty the cache: fresh */
        test_remove_tree(cache_root);
        mkdir(cache_root, 0700);
      }
      cm_jit *j = NULL;
      cm_err err = {0};
      if (cm_jit_create(&j, &o, &err) != CM_OK) {
        CHECK_MSG(0, "%s", err.msg);
        continue;
      }
      LLVMModuleRef m = build_axpy(cm_jit_context(j), "axpy");
      double t0 = now_ms();
      void *addr = NULL;
      CHECK(cm_jit_add_module(j, m, &err) == CM_OK);
      CHECK(cm_jit_lookup(j, "axpy", &addr, &err) == CM_OK);
      double t = now_ms() - t0;
      cm_jit_stats s;
      cm_jit_get_stats(j, &s);
      if (pass == 0) {
        CHECK(s.cache_misses == 1);
        if (t < best_fresh) best_fresh = t;
        if (s.compile_ms < best_fresh_compile) best_fresh_compile = s.compile_ms;
      } else {
        CHECK(s.cache_hits == 1);
        if (t < best_cached) best_cached = t;
        if (s.cache_load_ms < best_load) best_load = s.cache_load_ms;
      }
      cm_jit_destroy(j);
    }
  }
  fprintf(stderr,
          "  axpy O3, add+lookup (best of 5): fresh %.2f ms (passes+codegen %.2f ms), "
          "from cache %.3f ms (read+check %.3f ms)\n",
          best_fresh, best_fresh_compile, best_cached, best_load);
  CHECK(best_cached < best_fresh);
  test_remove_tree(cache_root);
}

/* ---- CMAEC_CPU: a named target CPU ----------------------------------------------------- */

#if defined(__x86_64__)
/* The axpy loop's assembly under the JIT as created now (CMAEC_CPU set by the caller). */
static char *axpy_asm(cm_jit *j) {
  LLVMModuleRef m = build_axpy(cm_jit_context(j), "axpy");
  char *text = NULL;
  cm_err err = {0};
  CHECK_MSG(cm_jit_render(j, m, CM_JIT_TEXT_ASM, &text, &err) == CM_OK, "%s", err.msg);
  LLVMDisposeModule(m);
  return text;
}

static void axpy_key(cm_jit *j, char key[65]) {
  LLVMModuleRef m = build_axpy(cm_jit_context(j), "axpy");
  cm_jit_module_key(j, m, key);
  LLVMDisposeModule(m);
}

static void test_forced_cpu(void) {
  cm_err err = {0};
  cm_jit *j = NULL;
  char host_key[65] = "", key[3][65] = {"", "", ""};
  CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
  if (j) axpy_key(j, host_key);
  cm_jit_destroy(j);
  char *host_features = LLVMGetHostCPUFeatures();
  bool host_avx512 = strstr(host_features, "+avx512f") && strstr(host_features, "+avx512bw") &&
                     strstr(host_features, "+avx512vl") && strstr(host_features, "+avx512dq") &&
                     strstr(host_features, "+avx512cd");
  bool host_avx2 = strstr(host_features, "+avx2") && strstr(host_features, "+fma") &&
                   strstr(host_features, "+bmi2") && strstr(host_features, "+movbe");
  LLVMDisposeMessage(host_features);

  /* The vector width follows the named CPU, not the host: x86-64 (v1) has SSE2 only, v3 AVX2,
   * v4 and skylake-avx512 AVX-512. */
  static const struct {
    const char *cpu;
    int bits;
    const char *vreg, *not_vreg; /* in the axpy loop's assembly, and not */
  } cpus[] = {{"x86-64", 128, "%xmm", "%ymm"},
              {"x86-64-v3", 256, "%ymm", "%zmm"},
              {"x86-64-v4", 512, "%zmm", NULL},
              {"skylake-avx512", 512, "%zmm", NULL}};
  for (int c = 0; c < 4; c++) {
    setenv("CMAEC_CPU", cpus[c].cpu, 1);
    cm_cpu_target t;
    CHECK_MSG(cm_cpu_target_resolve(NULL, NULL, &t, &err) == CM_OK, "%s", err.msg);
    CHECK_MSG(t.forced && !strcmp(t.cpu, cpus[c].cpu) && t.vector_bits == cpus[c].bits,
              "%s: cpu %s, %d-bit vectors", cpus[c].cpu, t.cpu, t.vector_bits);
    cm_target host;
    cm_target_host(&host);
    CHECK_MSG(host.kind == CM_TARGET_CPU && host.vector_lanes == cpus[c].bits / 32 &&
                  host.gemm.nr % host.vector_lanes == 0 && !strcmp(host.arch, cpus[c].cpu),
              "%s: %d lanes, nr %d, arch %s", cpus[c].cpu, host.vector_lanes, host.gemm.nr,
              host.arch);
    bool want_runnable = cpus[c].bits == 128 || (cpus[c].bits == 256 ? host_avx2 : host_avx512);
    CHECK_MSG(t.runnable == want_runnable, "%s: runnable %d (missing \"%s\")", cpus[c].cpu,
              t.runnable, t.missing);
    if (cpus[c].bits == 512) CHECK_STR_CONTAINS(t.features, "+avx512");
    /* Without compile_only, a CPU the host cannot run is refused, naming CMAEC_CPU and what the
     * host lacks; with it, its code is made and linked. */
    memset(&err, 0, sizeof err);
    cm_status st = cm_jit_create(&j, NULL, &err);
    CHECK_MSG(st == (t.runnable ? CM_OK : CM_EINVALID), "%s: %s", cpus[c].cpu, err.msg);
    if (!t.runnable) {
      CHECK(j == NULL);
      CHECK_STR_CONTAINS(err.msg, "CMAEC_CPU=");
      CHECK_STR_CONTAINS(err.msg, cpus[c].cpu);
      CHECK_STR_CONTAINS(err.msg, "avx512");
      cm_jit_opts co = {NULL, 3, NULL, NULL, 0, true};
      CHECK_MSG(cm_jit_create(&j, &co, &err) == CM_OK, "%s", err.msg);
    }
    if (!j) continue;
    CHECK_MSG(cm_jit_target(j)->vector_bits == cpus[c].bits && cm_jit_target(j)->forced,
              "%s: the JIT's target: %d bits", cpus[c].cpu, cm_jit_target(j)->vector_bits);
    const char *d = cm_jit_target_description(j);
    CHECK_MSG(strstr(d, cpus[c].cpu) && !strstr(d, ",-"), "description \"%s\"", d);
    char *text = axpy_asm(j);
    if (text) {
      CHECK_MSG(strstr(text, cpus[c].vreg) != NULL, "%s: no %s in the axpy loop", cpus[c].cpu,
                cpus[c].vreg);
      if (cpus[c].not_vreg)
        CHECK_MSG(strstr(text, cpus[c].not_vreg) == NULL, "%s: %s in the axpy loop", cpus[c].cpu,
                  cpus[c].not_vreg);
    }
    free(text);
    if (c < 3) axpy_key(j, key[c]);
    /* The object is made (and linked) either way; only a runnable one is called. */
    CHECK(cm_jit_add_module(j, build_axpy(cm_jit_context(j), "axpy"), &err) == CM_OK);
    void *addr = NULL;
    CHECK_MSG(cm_jit_lookup(j, "axpy", &addr, &err) == CM_OK, "%s", err.msg);
    cm_jit_stats s;
    cm_jit_get_stats(j, &s);
    CHECK_MSG(s.modules == 1 && s.object_bytes > 64, "%s: %d modules, %lld bytes", cpus[c].cpu,
              s.modules, (long long)s.object_bytes);
    if (addr && t.runnable) {
      axpy_fn f;
      memcpy(&f, &addr, sizeof f);
      CHECK_MSG(check_axpy(f, 1037) == 0, "%s", cpus[c].cpu);
    } else if (!t.runnable) {
      fprintf(stderr, "  %s: compiled (%lld bytes of code), not run: this host lacks %s\n",
              cpus[c].cpu, (long long)s.object_bytes, t.missing);
    }
    cm_jit_destroy(j);
    j = NULL;
  }

  /* Objects for different CPUs never share a cache key, nor with the host's. */
  for (int a = 0; a < 3; a++) {
    CHECK_MSG(key[a][0] && strcmp(key[a], host_key) != 0, "%s: the host's key", cpus[a].cpu);
    for (int b = 0; b < a; b++)
      CHECK_MSG(strcmp(key[a], key[b]) != 0, "%s and %s: one key", cpus[a].cpu, cpus[b].cpu);
  }
  /* The same CPU named by CMAEC_CPU or by cm_jit_opts: the same key. */
  unsetenv("CMAEC_CPU");
  cm_jit_opts named = {NULL, 3, "x86-64-v3", NULL, 0, true};
  char k[65] = "";
  CHECK(cm_jit_create(&j, &named, &err) == CM_OK);
  if (j) axpy_key(j, k);
  cm_jit_destroy(j);
  j = NULL;
  CHECK(strcmp(k, key[1]) == 0);

  /* An unknown name: an error naming CMAEC_CPU and the names LLVM knows; nothing is created. */
  setenv("CMAEC_CPU", "znver99", 1);
  memset(&err, 0, sizeof err);
  CHECK(cm_jit_create(&j, NULL, &err) == CM_EINVALID && j == NULL);
  CHECK_STR_CONTAINS(err.msg, "CMAEC_CPU=znver99");
  CHECK_STR_CONTAINS(err.msg, "x86-64-v3");
  CHECK_STR_CONTAINS(err.msg, "znver4");
  CHECK(strchr(err.msg, '\n') == NULL);
  cm_cpu_target t;
  CHECK(cm_cpu_target_resolve(NULL, NULL, &t, &err) == CM_EINVALID);
  cm_jit_opts bad = {NULL, 3, "no-such-cpu", NULL, 0, true}; /* compile_only does not excuse it */
  CHECK(cm_jit_create(&j, &bad, &err) == CM_EINVALID && j == NULL);
  CHECK_STR_CONTAINS(err.msg, "no-such-cpu");

  /* native (or empty): the host, as if unset. */
  for (int q = 0; q < 2; q++) {
    setenv("CMAEC_CPU", q ? "" : "native", 1);
    CHECK(cm_cpu_target_resolve(NULL, NULL, &t, &err) == CM_OK && !t.forced && t.runnable);
    CHECK(cm_jit_create(&j, NULL, &err) == CM_OK);
    if (j) {
      axpy_key(j, k);
      CHECK(strcmp(k, host_key) == 0);
      char *cpu = LLVMGetHostCPUName();
      CHECK_STR_CONTAINS(cm_jit_target_description(j), cpu);
      LLVMDisposeMessage(cpu);
    }
    cm_jit_destroy(j);
    j = NULL;
  }
  unsetenv("CMAEC_CPU");
}
#else
static void test_forced_cpu(void) { /* CMAEC_CPU names x86-64 CPUs only */
  setenv("CMAEC_CPU", "x86-64-v3", 1);
  cm_cpu_target t;
  cm_err err = {0};
  CHECK(cm_cpu_target_resolve(NULL, NULL, &t, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "x86-64 hosts only");
  unsetenv("CMAEC_CPU");
}
#endif

TEST_MAIN(TEST(test_create_and_description), TEST(test_axpy_o3_vectorized),
          TEST(test_other_context_and_levels), TEST(test_lookup_and_errors),
          TEST(test_cache_key_components), TEST(test_cache_hits_and_misses),
          TEST(test_cache_corruption), TEST(test_cache_several_processes), TEST(test_cache_timing),
          TEST(test_forced_cpu))
