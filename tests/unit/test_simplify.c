/* tests/unit/test_simplify.c — cm_kstage_simplify (codegen/kernel.c): random
 * stages of i64 index arithmetic (flatten/unflatten, nested div/mod, min/max,
 * compares, selects, negative intermediates) give the same stores before and
 * after (the interpreter), and the patterns it exists for lose their div/mod. */
#include "codegen/codegen.h"
#include "tests/test.h"
#include "tests/testlib.h"

#include <stdint.h>

static test_rng rng = {0x2545f4914f6cdd1dull};
static uint64_t next(void) {
  return test_u64(&rng);
}
static int64_t irand(int64_t lo, int64_t hi) { /* [lo, hi] */
  return test_int(&rng, lo, hi);
}

enum { IN_N = 997 };

/* 16 and 32 often: the innermost var gets split by them */
static int64_t divisor(void) {
  int64_t p = irand(0, 5);
  return p == 0 ? 16 : p == 1 ? 32 : irand(1, 70);
}

/* A random i64 expression over the stage's vars. */
static int gen(cm_kstage *s, int nv, int depth) {
  int pick = depth <= 0 ? (int)irand(0, 1) : (int)irand(0, 12);
  int a, b;
  switch (pick) {
  case 0: return cm_kx_var(s, (int)irand(0, nv - 1));
  case 1: return cm_kx_iconst(s, irand(0, 40));
  case 2: return cm_kx_iadd(s, gen(s, nv, depth - 1), gen(s, nv, depth - 1));
  case 3: return cm_kx_imul(s, gen(s, nv, depth - 1), cm_kx_iconst(s, irand(1, 70)));
  case 4: return cm_kx_idiv(s, gen(s, nv, depth - 1), cm_kx_iconst(s, divisor()));
  case 5: return cm_kx_imod(s, gen(s, nv, depth - 1), cm_kx_iconst(s, divisor()));
  case 6: /* flatten then unflatten: (x*C + y) split again by C */
    a = gen(s, nv, depth - 1);
    b = cm_kx_iconst(s, irand(2, 65));
    a = cm_kx_iadd(s, cm_kx_imul(s, a, b), cm_kx_var(s, (int)irand(0, nv - 1)));
    return irand(0, 1) ? cm_kx_imod(s, a, b) : cm_kx_idiv(s, a, b);
  case 7: /* div and mod recombined */
    a = gen(s, nv, depth - 1);
    b = cm_kx_iconst(s, irand(2, 40));
    return cm_kx_iadd(s, cm_kx_imul(s, cm_kx_idiv(s, a, b), b), cm_kx_imod(s, a, b));
  case 8:
    return cm_kx_op(s, CM_OP_SUB, CM_I64, gen(s, nv, depth - 1), cm_kx_iconst(s, irand(0, 30)), -1);
  case 9:
    return cm_kx_op(s, irand(0, 1) ? CM_OP_MIN : CM_OP_MAX, CM_I64, gen(s, nv, depth - 1),
                    gen(s, nv, depth - 1), -1);
  case 10: {
    static const cm_op cmp[4] = {CM_OP_LT, CM_OP_LE, CM_OP_EQ, CM_OP_NE};
    int c =
        cm_kx_op(s, cmp[irand(0, 3)], CM_BOOL, gen(s, nv, depth - 1), gen(s, nv, depth - 1), -1);
    return cm_kx_op(s, CM_OP_SELECT, CM_I64, c, gen(s, nv, depth - 1), gen(s, nv, depth - 1));
  }
  case 11: return cm_kx_op(s, CM_OP_NEG, CM_I64, gen(s, nv, depth - 1), -1, -1);
  default: /* a div of a div */
    return cm_kx_idiv(s, cm_kx_idiv(s, gen(s, nv, depth - 1), cm_kx_iconst(s, irand(1, 9))),
                      cm_kx_iconst(s, irand(1, 9)));
  }
}

static int count_kind(const cm_kstage *s, cm_kx_kind kind, cm_op op) {
  int n = 0;
  for (int e = 0; e < s->n_exprs; e++)
    n += s->exprs[e].kind == kind && (kind != CM_KX_OP || s->exprs[e].op == op);
  return n;
}

/* The stage's stores, run by the interpreter. */
static bool run(const cm_kernel *k, const float *in, float *out, int64_t out_n) {
  for (int64_t i = 0; i < out_n; i++) out[i] = -1;
  void *bufs[2] = {(void *)in, out};
  cm_err err = {0};
  cm_status st = cm_kernel_interpret(k, bufs, &err);
  CHECK_MSG(st == CM_OK, "%s", err.msg);
  return st == CM_OK;
}

/* The sanitizer build (CMAEC_TEST_QUICK: its interpreter ~40x slower, 600 s for every stage) runs
 * the interpreter on the stages of at most QUICK_ITERS iterations; every stage is still simplified
 * and verified there. The release build compares every stage. */
enum { QUICK_ITERS = 1 << 16 };

static void test_random_stages(void) {
  bool quick = getenv("CMAEC_TEST_QUICK") != NULL;
  int compared = 0;
  float in[IN_N];
  for (int i = 0; i < IN_N; i++) in[i] = (float)(next() % 100000) * 0.01f - 500.0f;
  int changed = 0, split = 0;
  for (int trial = 0; trial < 400; trial++) {
    cm_kernel k;
    cm_kernel_init(&k, "k_simp");
    int n_dom = (int)irand(1, 3), n_red = (int)irand(0, 2);
    int64_t out_n = 1;
    cm_kstage *s = cm_kernel_add_stage(&k, "s");
    s->n_dom = n_dom, s->n_red = n_red, s->n_parallel = n_dom;
    static const int64_t exts[] = {1, 2, 3, 5, 7, 13, 16, 31, 64, 65, 96, 48};
    for (int v = 0; v < n_dom; v++) out_n *= (s->dom[v] = exts[irand(0, 11)]);
    int64_t iters = out_n;
    for (int v = 0; v < n_red; v++) iters *= (s->red[v] = exts[irand(0, 7)]);
    bool interpret = !quick || iters <= QUICK_ITERS;
    int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, IN_N, 0, 0);
    int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, out_n, 1, 0);
    s = &k.stages[0];
    int nv = n_dom + n_red;
    /* index in bounds whatever the expression: max(e, 0) mod IN_N */
    int e = gen(s, nv, (int)irand(2, 5));
    int idx = cm_kx_imod(s, cm_kx_op(s, CM_OP_MAX, CM_I64, e, cm_kx_iconst(s, 0), -1),
                         cm_kx_iconst(s, IN_N));
    int val = cm_kx_load(s, &k, bi, idx);
    /* an index-valued term too, so that wrong arithmetic shows in the value */
    int term = cm_kx_op(s, CM_OP_CAST, CM_F32, gen(s, n_dom, 3), -1, -1);
    int lin = cm_kx_iconst(s, 0);
    for (int v = 0; v < n_dom; v++)
      lin = cm_kx_iadd(s, cm_kx_imul(s, lin, cm_kx_iconst(s, s->dom[v])), cm_kx_var(s, v));
    if (n_red > 0) {
      s->red_op = irand(0, 1) ? CM_KRED_SUM : CM_KRED_MAX;
      s->body = val;
      int acc = cm_kx_acc(s);
      s->stores[s->n_stores++] =
          (cm_kstore){bo, lin, cm_kx_op(s, CM_OP_ADD, CM_F32, acc, term, -1)};
    } else {
      s->body = -1;
      s->stores[s->n_stores++] =
          (cm_kstore){bo, lin, cm_kx_op(s, CM_OP_ADD, CM_F32, val, term, -1)};
    }
    cm_err err = {0};
    CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "%s", err.msg);
    float *want = malloc(sizeof(float) * (size_t)out_n),
          *got = malloc(sizeof(float) * (size_t)out_n);
    bool ok = interpret && run(&k, in, want, out_n);
    compared += interpret;
    int before = k.stages[0].n_exprs;
    cm_status st = cm_kstage_simplify(&k.stages[0], &err);
    CHECK_MSG(st == CM_OK, "trial %d: %s", trial, err.msg);
    CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "trial %d: %s", trial, err.msg);
    changed += k.stages[0].n_exprs != before;
    split += k.stages[0].n_dom != n_dom;
    ok = ok && run(&k, in, got, out_n);
    int bad = 0;
    for (int64_t i = 0; ok && i < out_n; i++) bad += memcmp(&got[i], &want[i], sizeof(float)) != 0;
    CHECK_MSG(bad == 0, "trial %d: %d of %lld stores differ after simplify", trial, bad,
              (long long)out_n);
    if (bad) cm_kernel_print(&k, stderr);
    free(want), free(got);
    cm_kernel_free(&k);
  }
  CHECK_MSG(changed > 100, "only %d of 400 stages changed", changed);
  CHECK_MSG(split > 2, "only %d of 400 stages had their innermost var split", split);
  CHECK_MSG(compared >= (quick ? 300 : 400), "only %d of 400 stages run before and after",
            compared);
  if (quick) fprintf(stderr, "random_stages: %d of 400 stages run (CMAEC_TEST_QUICK)\n", compared);
}

/* out[v0*512 + v1] = in[((v0*512 + v1) mod 512) + 512 * ((v0*512 + v1) div 512)], the shape of
 * a flattened elementwise stage: the index becomes v0*512 + v1 with no div or mod left. */
static void test_flatten_pattern(void) {
  cm_kernel k;
  cm_kernel_init(&k, "k_flat");
  int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 7 * 512, 0, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 7 * 512, 1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "s");
  s->n_dom = 2, s->dom[0] = 7, s->dom[1] = 512, s->n_parallel = 1, s->body = -1;
  int c512 = cm_kx_iconst(s, 512);
  int flat = cm_kx_iadd(s, cm_kx_imul(s, cm_kx_var(s, 0), c512), cm_kx_var(s, 1));
  int j = cm_kx_imod(s, flat, c512), i = cm_kx_idiv(s, flat, c512);
  /* and (i mod 7) stays i: i < 7 */
  int i2 = cm_kx_imod(s, i, cm_kx_iconst(s, 7));
  int idx = cm_kx_iadd(s, cm_kx_imul(s, i2, c512), j);
  int pad = cm_kx_op(s, CM_OP_LT, CM_BOOL, j, cm_kx_iconst(s, 600), -1); /* always true */
  int v =
      cm_kx_op(s, CM_OP_SELECT, CM_F32, pad, cm_kx_load(s, &k, bi, idx), cm_kx_const(s, CM_F32, 0));
  s->stores[s->n_stores++] = (cm_kstore){bo, flat, v};
  float in[7 * 512], want[7 * 512], got[7 * 512];
  for (int q = 0; q < 7 * 512; q++) in[q] = (float)(next() % 1000) - 500.0f;
  CHECK(run(&k, in, want, 7 * 512));
  cm_err err = {0};
  CHECK_MSG(cm_kstage_simplify(&k.stages[0], &err) == CM_OK, "%s", err.msg);
  s = &k.stages[0];
  if (getenv("SIMPLIFY_PRINT")) cm_kernel_print(&k, stderr);
  CHECK(count_kind(s, CM_KX_MOD, 0) == 0);
  CHECK(count_kind(s, CM_KX_OP, CM_OP_DIV) == 0);
  CHECK(count_kind(s, CM_KX_OP, CM_OP_SELECT) == 0);
  CHECK(count_kind(s, CM_KX_OP, CM_OP_LT) == 0);
  CHECK(s->exprs[s->stores[0].index].kind == CM_KX_OP);
  CHECK(run(&k, in, got, 7 * 512));
  CHECK(memcmp(got, want, sizeof got) == 0);
  cm_kernel_free(&k);
}

/* Nested unflattening of a 4-d index by 32, 4, 3, 65 (as a patch embedding's
 * gradient reads it): (x div 32) div 4 -> x div 128, and mods whose range fits vanish. */
static void test_nested_pattern(void) {
  cm_kernel k;
  cm_kernel_init(&k, "k_nest");
  int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 65 * 384, 0, 0);
  int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 384, 1, 0);
  cm_kstage *s = cm_kernel_add_stage(&k, "s");
  s->n_dom = 1, s->dom[0] = 384, s->n_parallel = 1, s->n_red = 1, s->red[0] = 65;
  int x = cm_kx_iadd(s, cm_kx_imul(s, cm_kx_var(s, 1), cm_kx_iconst(s, 384)), cm_kx_var(s, 0));
  int q32 = cm_kx_idiv(s, x, cm_kx_iconst(s, 32)), r32 = cm_kx_imod(s, x, cm_kx_iconst(s, 32));
  int q4 = cm_kx_idiv(s, q32, cm_kx_iconst(s, 4)), r4 = cm_kx_imod(s, q32, cm_kx_iconst(s, 4));
  int q3 = cm_kx_idiv(s, q4, cm_kx_iconst(s, 3)), r3 = cm_kx_imod(s, q4, cm_kx_iconst(s, 3));
  int row = cm_kx_imod(s, q3, cm_kx_iconst(s, 65));
  /* rebuild: ((row*3 + r3)*4 + r4)*32 + r32 == x */
  int idx = cm_kx_iadd(
      s,
      cm_kx_imul(s,
                 cm_kx_iadd(s,
                            cm_kx_imul(s, cm_kx_iadd(s, cm_kx_imul(s, row, cm_kx_iconst(s, 3)), r3),
                                       cm_kx_iconst(s, 4)),
                            r4),
                 cm_kx_iconst(s, 32)),
      r32);
  s->body = cm_kx_load(s, &k, bi, idx);
  s->stores[s->n_stores++] = (cm_kstore){bo, cm_kx_var(s, 0), cm_kx_acc(s)};
  float in[65 * 384], want[384], got[384];
  for (int q = 0; q < 65 * 384; q++) in[q] = (float)(next() % 1000) * 0.25f;
  CHECK(run(&k, in, want, 384));
  cm_err err = {0};
  CHECK_MSG(cm_kstage_simplify(&k.stages[0], &err) == CM_OK, "%s", err.msg);
  s = &k.stages[0];
  CHECK_MSG(count_kind(s, CM_KX_MOD, 0) == 0 && count_kind(s, CM_KX_OP, CM_OP_DIV) == 0,
            "%d mod, %d div left", count_kind(s, CM_KX_MOD, 0), count_kind(s, CM_KX_OP, CM_OP_DIV));
  CHECK(run(&k, in, got, 384));
  CHECK(memcmp(got, want, sizeof got) == 0);
  cm_kernel_free(&k);
}

/* out[j] = sum_r in[r*384 + ((j div 32) mod 4)*96 + (j div 128)*32 + j mod 32] over j < 384 (a
 * q/k/v split of heads x head dim, as a bias gradient reads it): the innermost var is split
 * into q*32 + r, after which no div or mod reads r and r runs contiguously. */
static void test_split_pattern(void) {
  for (int red = 0; red < 2; red++) {
    cm_kernel k;
    cm_kernel_init(&k, "k_split");
    int bi = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 5 * 384, 0, 0);
    int bo = cm_kernel_add_buffer(&k, CM_KBUF_ARENA, CM_F32, 5 * 384, 1, 0);
    cm_kstage *s = cm_kernel_add_stage(&k, "s");
    int r, j;
    if (red) {
      s->n_dom = 1, s->dom[0] = 384, s->n_parallel = 1, s->n_red = 1, s->red[0] = 5;
      j = cm_kx_var(s, 0), r = cm_kx_var(s, 1);
    } else {
      s->n_dom = 2, s->dom[0] = 5, s->dom[1] = 384, s->n_parallel = 1, s->body = -1;
      r = cm_kx_var(s, 0), j = cm_kx_var(s, 1);
    }
    int c32 = cm_kx_iconst(s, 32);
    int head = cm_kx_imod(s, cm_kx_idiv(s, j, c32), cm_kx_iconst(s, 4));
    int which = cm_kx_idiv(s, j, cm_kx_iconst(s, 128));
    int idx =
        cm_kx_iadd(s, cm_kx_imul(s, r, cm_kx_iconst(s, 384)),
                   cm_kx_iadd(s, cm_kx_imul(s, head, cm_kx_iconst(s, 96)),
                              cm_kx_iadd(s, cm_kx_imul(s, which, c32), cm_kx_imod(s, j, c32))));
    int ld = cm_kx_load(s, &k, bi, idx);
    if (red) {
      s->body = ld;
      s->stores[s->n_stores++] = (cm_kstore){bo, j, cm_kx_acc(s)};
    } else {
      s->stores[s->n_stores++] =
          (cm_kstore){bo, cm_kx_iadd(s, cm_kx_imul(s, r, cm_kx_iconst(s, 384)), j), ld};
    }
    float in[5 * 384], want[5 * 384], got[5 * 384];
    for (int q = 0; q < 5 * 384; q++) in[q] = (float)(next() % 1000) * 0.5f;
    CHECK(run(&k, in, want, 5 * 384));
    cm_err err = {0};
    CHECK_MSG(cm_kstage_simplify(&k.stages[0], &err) == CM_OK, "%s", err.msg);
    s = &k.stages[0];
    if (getenv("SIMPLIFY_PRINT")) cm_kernel_print(&k, stderr);
    CHECK_MSG(s->n_dom == (red ? 2 : 3), "n_dom %d", s->n_dom);
    CHECK(s->dom[s->n_dom - 1] == 32 && s->dom[s->n_dom - 2] == 12);
    CHECK(s->n_parallel == (red ? 2 : 1));
    /* what div/mod is left reads the outer part only */
    int inner = 0;
    for (int e = 0; e < s->n_exprs; e++)
      if (s->exprs[e].kind == CM_KX_MOD ||
          (s->exprs[e].kind == CM_KX_OP && s->exprs[e].op == CM_OP_DIV))
        inner += (cm_kx_vars_used(s, s->exprs[e].a) >> (s->n_dom - 1)) & 1;
    CHECK(inner == 0);
    CHECK_MSG(cm_kernel_verify(&k, &err) == CM_OK, "%s", err.msg);
    CHECK(run(&k, in, got, 5 * 384));
    CHECK(memcmp(got, want, sizeof got) == 0);
    cm_kernel_free(&k);
  }
}

static void test_errors(void) {
  cm_kernel k;
  cm_kernel_init(&k, "k_bad");
  cm_kstage *s = cm_kernel_add_stage(&k, "s");
  s->n_dom = 1, s->dom[0] = 4, s->body = -1;
  int v = cm_kx_var(s, 0);
  int a = cm_kx_iadd(s, v, cm_kx_iconst(s, 1));
  s->exprs[a].b = a; /* an operand not smaller than its expression */
  s->stores[s->n_stores++] = (cm_kstore){0, a, a};
  cm_err err = {0};
  CHECK(cm_kstage_simplify(s, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "not smaller");
  cm_kernel_free(&k);
}

TEST_MAIN({"random_stages", test_random_stages}, {"flatten_pattern", test_flatten_pattern},
          {"nested_pattern", test_nested_pattern}, {"split_pattern", test_split_pattern},
          {"errors", test_errors})
