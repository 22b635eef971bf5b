/* codegen/tune_space.c — the autotuner's view of a lowered kernel's plan (codegen.h, "tuning
 * spaces"): per stage, the knobs its renderer really honours with their candidates, applying a
 * point (re-deriving what depends on it and refusing what makes no valid plan, before anything
 * is compiled), the structural hash that keys the tuning database, and a deterministic cost model.
 *
 * The spaces (docs/codegen.md, "Tuning spaces"):
 *   CPU GEMM stage (packed GEMM, f32 accumulator, not inside an attention span):
 *     mr, nr (register block), mc, nc (cache block of C), kc (K slice)
 *   CPU attention span (its first stage): mr, nr (the span's register block and workspace
 *     layout; each GEMM stage's own block then follows attention.c's cost model), br (query rows
 *     per block), bc (key block, streaming spans only)
 *   CUDA tensor-core GEMM: warps_m, warps_n, mr, nr (warp tile), kc, stages, split_k, swizzle
 *   CUDA FMA GEMM: mc, nc, kc, mr, nr (the stage's tiles)
 *   CUDA rows span (its first stage): warp (a warp per row, else a block), threads (per block)
 *   CUDA generic stage: red (a thread, warp or block per point), threads (per block)
 *   CUDA flash attention forward: warps (a block's, 16 query rows each), bc (keys per block);
 *     backward: warps, bc (cu_flash_refit prunes by shared memory and a register estimate)
 *   CPU GEMM also: k_split (1, 2, 4, 8 and the lowering's: a K split's partial GEMM, _kpart, or a
 *     GEMM that may split; a change adds or removes the _ksum stage after it: cm_gemm_resplit)
 * Not knobs: the CPU thread split (the executor splits work items), the CPU row kernels' vector
 * width (a render option for the whole program, not a stage field), the other CUDA attention
 * spans (their renderers take fixed thread counts and tiles). */
#include "lower_internal.h"
#include "render_cuda.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum space_kind {
  SP_NONE,
  SP_CPU_GEMM,
  SP_CPU_ATTN,
  SP_CUDA_MMA,
  SP_CUDA_FMA,
  SP_CUDA_ROWS,
  SP_CUDA_GENERIC,
  SP_CUDA_FLASH,     /* flash attention forward on tensor cores */
  SP_CUDA_FLASH_BWD, /* and backward */
} space_kind;

#define WORKSPACE_BUDGET ((int64_t)16 << 20) /* CPU per-thread workspace a point may take */
#define MMA_MAX_ACC 64 /* accumulators a thread: more spills under the launch bounds' 128 regs */

static int64_t round_up(int64_t v, int64_t m) {
  return (v + m - 1) / m * m;
}

static bool is_attn(const cm_kstage *s) {
  return s->tmpl == CM_KT_ATTENTION_FWD || s->tmpl == CM_KT_ATTENTION_BWD;
}

/* Whether stage si runs inside the attention span of an earlier stage. */
static bool in_attn_span(const cm_kernel *k, int si) {
  for (int f = 0; f < si; f++)
    if (is_attn(&k->stages[f]) && si < f + k->stages[f].attn.span) return true;
  return false;
}

static bool cpu_gemm_stage(const cm_kstage *s) {
  return s->tmpl == CM_KT_GEMM && s->acc_dtype == CM_F32 && s->n_dom >= 2 && s->n_red == 1 &&
         s->tiles.mr > 0 && s->tiles.nr > 0 && s->tiles.mc > 0 && s->tiles.nc > 0 &&
         s->tiles.kc > 0;
}

static space_kind kind_of(const cm_kernel *k, int si, const cm_target *t) {
  const cm_kstage *s = &k->stages[si];
  if (s->coll.op != CM_KCOLL_NONE) return SP_NONE; /* a communicator's call: nothing to tune */
  if (t->kind == CM_TARGET_CPU) {
    if (t->vector_lanes < 1 || in_attn_span(k, si)) return SP_NONE;
    if (is_attn(s))
      return s->attn.span >= 2 && s->n_dom >= 2 && s->tiles.mr > 0 && s->tiles.nr > 0 ? SP_CPU_ATTN
                                                                                      : SP_NONE;
    return cpu_gemm_stage(s) ? SP_CPU_GEMM : SP_NONE;
  }
  const cm_kcuda_plan *p = &s->cuda;
  if (p->sm != t->sm) return SP_NONE;
  if (p->kind == CM_KCUDA_GEMM) return p->gemm.mma ? SP_CUDA_MMA : SP_CUDA_FMA;
  if (p->kind == CM_KCUDA_ROWS) return SP_CUDA_ROWS;
  if (p->kind == CM_KCUDA_GENERIC) return SP_CUDA_GENERIC;
  if (p->kind == CM_KCUDA_ATTN_FLASH) return SP_CUDA_FLASH;
  if (p->kind == CM_KCUDA_ATTN_FLASH_BWD) return SP_CUDA_FLASH_BWD;
  return SP_NONE;
}

/* ---- building spaces ------------------------------------------------------------------ */

static int cmp_int(const void *a, const void *b) {
  int x = *(const int *)a, y = *(const int *)b;
  return (x > y) - (x < y);
}

/* Adds knob `name` with the candidates (>= 0) cand[0..n) and the default def (a knob with a
 * single value is left out: nothing to choose). */
static void add_knob(cm_tune_space *sp, const char *name, const int *cand, int n, int def) {
  if (sp->n_knobs >= CM_TUNE_MAX_KNOBS) return;
  cm_tune_knob kn;
  memset(&kn, 0, sizeof kn);
  snprintf(kn.name, sizeof kn.name, "%s", name);
  int v[CM_TUNE_MAX_VALUES + 1], nv = 0;
  v[nv++] = def;
  for (int i = 0; i < n && nv < CM_TUNE_MAX_VALUES; i++)
    if (cand[i] >= 0) v[nv++] = cand[i];
  qsort(v, (size_t)nv, sizeof *v, cmp_int);
  for (int i = 0; i < nv; i++)
    if (kn.n_values == 0 || v[i] != kn.values[kn.n_values - 1]) kn.values[kn.n_values++] = v[i];
  for (int i = 0; i < kn.n_values; i++)
    if (kn.values[i] == def) kn.default_index = i;
  if (kn.n_values > 1) sp->knobs[sp->n_knobs++] = kn;
}

/* Multiples of unit from the list below cap, then cap itself when it is at most top. */
static int cands_below(const int *list, int n, int64_t cap, int64_t top, int *out) {
  int m = 0;
  for (int i = 0; i < n; i++)
    if (list[i] < cap) out[m++] = list[i];
  if (cap <= top) out[m++] = (int)cap;
  return m;
}

static const int CPU_MR[] = {2, 3, 4, 6, 8}; /* every one divides 24 */

/* The vector registers of the CPU target: 32 with AVX-512, else 16. */
static int cpu_vector_regs(const cm_target *t) {
  return t->vector_lanes >= 16 ? 32 : 16;
}

static void space_cpu_gemm(const cm_kernel *k, int si, const cm_target *t, cm_tune_space *sp) {
  const cm_kstage *s = &k->stages[si];
  int W = t->vector_lanes, c[CM_TUNE_MAX_VALUES];
  int64_t M = s->dom[s->n_dom - 2], N = s->dom[s->n_dom - 1], K = s->red[0];
  add_knob(sp, "mr", CPU_MR, 5, s->tiles.mr);
  int nr[4] = {W, 2 * W, 3 * W, 4 * W};
  add_knob(sp, "nr", nr, 4, s->tiles.nr);
  /* mc a multiple of 24 (every mr candidate), nc of 12 W (every nr candidate) */
  static const int mc[] = {48, 96, 144, 240, 480};
  add_knob(sp, "mc", c, cands_below(mc, 5, round_up(M, 24), 960, c), s->tiles.mc);
  int L = 12 * W, nc[4] = {L, 2 * L, 4 * L, 8 * L};
  add_knob(sp, "nc", c, cands_below(nc, 4, round_up(N, L), 2048, c), s->tiles.nc);
  static const int kc[] = {64, 128, 256, 512};
  add_knob(sp, "kc", c, cands_below(kc, 4, K, 1024, c), s->tiles.kc);
  int split = cm_gemm_k_split_at(k, si);
  add_knob(sp, "k_split", c, cm_gemm_k_split_options(k, si, c), split > 0 ? split : 1);
}

static bool attn_gemm_stage(const cm_kattn *a, const cm_kstage *s, bool first);

/* The GEMM stages of a whole-row span after its first that get a register block of their own as
 * knobs "mr<r>", "nr<r>" (r: the stage's place in the span): the first two of them. */
static int attn_stage_knobs(const cm_kernel *k, int first, int *r_out) {
  const cm_kattn *a = &k->stages[first].attn;
  int n = 0;
  for (int r = 1; !a->stream && r < a->span && first + r < k->n_stages && n < 2; r++)
    if (attn_gemm_stage(a, &k->stages[first + r], false)) r_out[n++] = r;
  return n;
}

/* Stage r's register block in the plan: its own (attention.c's cost model), else the span's. */
static void attn_stage_block(const cm_kstage *s0, int r, int W, int *mr, int *nr) {
  const cm_kattn *a = &s0->attn;
  *mr = s0->tiles.mr, *nr = s0->tiles.nr;
  if (a->lanes == W && a->mr[r] > 0 && a->nr[r] > 0) *mr = a->mr[r], *nr = a->nr[r];
}

static void space_cpu_attn(const cm_kernel *k, int first, const cm_target *t, cm_tune_space *sp) {
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  int W = t->vector_lanes, c[CM_TUNE_MAX_VALUES];
  add_knob(sp, "mr", CPU_MR, 5, s0->tiles.mr);
  int nr[4] = {W, 2 * W, 3 * W, 4 * W};
  add_knob(sp, "nr", nr, 4, s0->tiles.nr);
  /* the backward streaming rendering keeps whole batch items (br == rows) */
  if (!(a->stream && s0->tmpl == CM_KT_ATTENTION_BWD)) {
    static const int br[] = {24, 48, 72, 96, 144, 192};
    add_knob(sp, "br", c, cands_below(br, 6, a->rows, a->rows, c), a->br);
  }
  if (a->stream) {
    static const int bc[] = {16, 32, 64, 128, 256};
    int64_t keys = s0->dom[s0->n_dom - 1];
    int m = 0;
    for (int i = 0; i < 5; i++)
      if (bc[i] < keys) c[m++] = bc[i];
    add_knob(sp, "bc", c, m, a->bc);
  }
  int rs[2], n = attn_stage_knobs(k, first, rs);
  for (int i = 0; i < n; i++) {
    int smr, snr;
    char name[16];
    attn_stage_block(s0, rs[i], W, &smr, &snr);
    snprintf(name, sizeof name, "mr%d", rs[i]);
    add_knob(sp, name, CPU_MR, 5, smr);
    snprintf(name, sizeof name, "nr%d", rs[i]);
    add_knob(sp, name, nr, 4, snr);
  }
}

static void space_cuda_mma(const cm_kcuda_gemm *g, cm_tune_space *sp) {
  static const int w[] = {1, 2, 4}, tile[] = {16, 32, 64}, st[] = {2, 3, 4, 6}, sk[] = {1, 2, 4},
                   sw[] = {0, 1};
  add_knob(sp, "warps_m", w, 3, g->warps_m);
  add_knob(sp, "warps_n", w, 3, g->warps_n);
  add_knob(sp, "mr", tile, 3, g->mr);
  add_knob(sp, "nr", tile, 3, g->nr);
  add_knob(sp, "kc", tile, 3, g->kc);
  add_knob(sp, "stages", st, 4, g->stages);
  add_knob(sp, "split_k", sk, 3, g->split_k);
  add_knob(sp, "swizzle", sw, 2, g->swizzle ? 1 : 0);
}

static void space_cuda_fma(const cm_kcuda_gemm *g, cm_tune_space *sp) {
  static const int blk[] = {32, 64, 128}, kc[] = {8, 16, 32}, warp[] = {16, 32, 64};
  add_knob(sp, "mc", blk, 3, g->mc);
  add_knob(sp, "nc", blk, 3, g->nc);
  add_knob(sp, "kc", kc, 3, g->kc);
  add_knob(sp, "mr", warp, 3, g->mr);
  add_knob(sp, "nr", warp, 3, g->nr);
}

static void space_cuda_rows(const cm_kcuda_rows *r, const cm_target *t, cm_tune_space *sp) {
  static const int warp[] = {0, 1};
  int th[5], n = 0;
  for (int v = 64; v <= 1024 && v <= t->max_threads_per_block; v *= 2) th[n++] = v;
  add_knob(sp, "warp", warp, 2, r->warp ? 1 : 0);
  add_knob(sp, "threads", th, n, r->threads);
}

/* A generic stage: who computes a point (0 a thread, 1 a warp, 2 a block: only for a reduction
 * that does not accumulate) and the threads per block. */
static void space_cuda_generic(const cm_kstage *s, const cm_target *t, cm_tune_space *sp) {
  static const int red[] = {CM_KCUDA_RED_THREAD, CM_KCUDA_RED_WARP, CM_KCUDA_RED_BLOCK};
  int th[5], n = 0;
  for (int v = 64; v <= 1024 && v <= t->max_threads_per_block; v *= 2) th[n++] = v;
  if (s->n_red > 0 && !s->accumulate) add_knob(sp, "red", red, 3, (int)s->cuda.red);
  add_knob(sp, "threads", th, n, (int)s->cuda.block[0]);
}

/* Flash attention: warps a block (forward: 16 query rows each) and keys per block. */
static void space_cuda_flash(const cm_kcuda_attn *a, bool backward, cm_tune_space *sp) {
  static const int fwd_warps[] = {2, 4, 8}, bwd_warps[] = {4, 8}, bc[] = {32, 64, 128};
  if (backward)
    add_knob(sp, "warps", bwd_warps, 2, a->threads / 32);
  else
    add_knob(sp, "warps", fwd_warps, 3, a->threads / 32);
  add_knob(sp, "bc", bc, 3, a->bc);
}

static cm_status check_args(const cm_kernel *k, int stage, const cm_target *t, const char *fn,
                            cm_err *err) {
  if (!k || !t || stage < 0 || stage >= k->n_stages || !k->stages)
    return cm_errorf(err, CM_EINVALID, "%s: no kernel or target, or stage %d out of range", fn,
                     stage);
  return CM_OK;
}

cm_status cm_tune_space_of(const cm_kernel *k, int stage, const cm_target *t, cm_tune_space *out,
                           cm_err *err) {
  if (!out) return cm_errorf(err, CM_EINVALID, "cm_tune_space_of: no output");
  memset(out, 0, sizeof *out);
  out->n_points = 1;
  cm_status st = check_args(k, stage, t, "cm_tune_space_of", err);
  if (st != CM_OK) return st;
  const cm_kstage *s = &k->stages[stage];
  space_kind kind = kind_of(k, stage, t);
  switch (kind) {
  case SP_NONE: break;
  case SP_CPU_GEMM: space_cpu_gemm(k, stage, t, out); break;
  case SP_CPU_ATTN: space_cpu_attn(k, stage, t, out); break;
  case SP_CUDA_MMA: space_cuda_mma(&s->cuda.gemm, out); break;
  case SP_CUDA_FMA: space_cuda_fma(&s->cuda.gemm, out); break;
  case SP_CUDA_ROWS: space_cuda_rows(&s->cuda.rows, t, out); break;
  case SP_CUDA_GENERIC: space_cuda_generic(s, t, out); break;
  case SP_CUDA_FLASH:
  case SP_CUDA_FLASH_BWD: space_cuda_flash(&s->cuda.attn, kind == SP_CUDA_FLASH_BWD, out); break;
  }
  for (int i = 0; i < out->n_knobs; i++) out->n_points *= out->knobs[i].n_values;
  return CM_OK;
}

/* ---- points ---------------------------------------------------------------------------- */

void cm_tune_point_default(const cm_tune_space *s, cm_tune_point *out) {
  memset(out, 0, sizeof *out);
  for (int i = 0; i < s->n_knobs; i++)
    out->value[i] = s->knobs[i].values[s->knobs[i].default_index];
}

/* Mixed radix, the first knob fastest; digit d of a knob is the candidate d places after its
 * default (cyclically), so point 0 is the default and points 1.. vary the first knob first. */
void cm_tune_point_at(const cm_tune_space *s, int64_t i, cm_tune_point *out) {
  memset(out, 0, sizeof *out);
  if (s->n_points > 0) i %= s->n_points;
  if (i < 0) i += s->n_points;
  for (int k = 0; k < s->n_knobs; k++) {
    const cm_tune_knob *kn = &s->knobs[k];
    int d = (int)(i % kn->n_values);
    i /= kn->n_values;
    out->value[k] = kn->values[(kn->default_index + d) % kn->n_values];
  }
}

int cm_tune_point_format(const cm_tune_space *s, const cm_tune_point *p, char *buf, size_t size) {
  int n = 0;
  if (size > 0) buf[0] = 0;
  for (int k = 0; k < s->n_knobs; k++) {
    int w = snprintf(size > (size_t)n ? buf + n : NULL, size > (size_t)n ? size - (size_t)n : 0,
                     "%s%s=%d", k ? "," : "", s->knobs[k].name, p->value[k]);
    if (w < 0) return w;
    n += w;
  }
  return n;
}

static int knob_index(const cm_tune_space *s, const char *name, size_t len) {
  for (int k = 0; k < s->n_knobs; k++)
    if (strlen(s->knobs[k].name) == len && !strncmp(s->knobs[k].name, name, len)) return k;
  return -1;
}

static bool is_candidate(const cm_tune_knob *kn, int v) {
  for (int i = 0; i < kn->n_values; i++)
    if (kn->values[i] == v) return true;
  return false;
}

cm_status cm_tune_point_parse(const cm_tune_space *s, const char *text, cm_tune_point *out,
                              cm_err *err) {
  memset(out, 0, sizeof *out);
  if (!s || !text) return cm_errorf(err, CM_EINVALID, "tuning point: no space or no text");
  bool seen[CM_TUNE_MAX_KNOBS] = {false};
  const char *p = text;
  while (*p) {
    const char *eq = strchr(p, '='), *end = strchr(p, ',');
    if (!end) end = p + strlen(p);
    if (!eq || eq > end)
      return cm_errorf(err, CM_EINVALID, "tuning point \"%s\": expected name=value at \"%.*s\"",
                       text, (int)(end - p), p);
    int k = knob_index(s, p, (size_t)(eq - p));
    if (k < 0 || seen[k])
      return cm_errorf(err, CM_EINVALID, "tuning point \"%s\": %s knob \"%.*s\"", text,
                       k < 0 ? "no" : "a second", (int)(eq - p), p);
    char *stop = NULL;
    long v = strtol(eq + 1, &stop, 10);
    if (stop != end || eq + 1 == end || !is_candidate(&s->knobs[k], (int)v) || v != (int)v)
      return cm_errorf(err, CM_EINVALID,
                       "tuning point \"%s\": %s=%.*s is not one of the knob's candidates", text,
                       s->knobs[k].name, (int)(end - eq - 1), eq + 1);
    seen[k] = true;
    out->value[k] = (int)v;
    p = *end ? end + 1 : end;
  }
  for (int k = 0; k < s->n_knobs; k++)
    if (!seen[k])
      return cm_errorf(err, CM_EINVALID, "tuning point \"%s\": knob %s missing", text,
                       s->knobs[k].name);
  return CM_OK;
}

/* ---- applying points ------------------------------------------------------------------- */

/* The point's value of knob name (fallback when the space has no such knob). */
static int value_of(const cm_tune_space *sp, const cm_tune_point *p, const char *name,
                    int fallback) {
  int k = knob_index(sp, name, strlen(name));
  return k < 0 ? fallback : p->value[k];
}

#define REFUSE(...) return cm_errorf(err, CM_EINVALID, __VA_ARGS__)

/* A register block the CPU micro-kernel takes: nr whole vectors (at most 8), mr x nr within
 * max_vectors accumulators and, with the B vectors and a broadcast, within regs vector registers
 * (0: the target's). */
static cm_status check_cpu_block(const cm_kernel *k, int si, const cm_target *t, int mr, int nr,
                                 int max_vectors, int regs, cm_err *err) {
  int W = t->vector_lanes;
  if (regs <= 0) regs = cpu_vector_regs(t);
  if (mr < 1 || nr < W || nr % W || nr / W > 8 || mr * (nr / W) > max_vectors)
    REFUSE("kernel %s stage %d: knob mr x nr = %dx%d: nr must be 1..8 vectors of %d lanes and "
           "mr x nr at most %d vectors",
           k->name, si, mr, nr, W, max_vectors);
  if (mr * (nr / W) + nr / W + 1 > regs)
    REFUSE("kernel %s stage %d: knob mr x nr = %dx%d: %d accumulators, %d B vectors and a "
           "broadcast exceed the %d vector registers (spills)",
           k->name, si, mr, nr, mr * (nr / W), nr / W, regs);
  return CM_OK;
}

/* v clamped to cap (a block beyond the extent is the extent); refused when a smaller candidate
 * that is a multiple of `unit` already reaches cap (the same plan twice in the space). */
static cm_status clamp_tile(const cm_kernel *k, int si, const cm_tune_space *sp, const char *name,
                            int v, int unit, int64_t cap, int *out, cm_err *err) {
  *out = v;
  if (v <= cap) return CM_OK;
  int ki = knob_index(sp, name, strlen(name));
  for (int i = 0; ki >= 0 && i < sp->knobs[ki].n_values; i++) {
    int c = sp->knobs[ki].values[i];
    if (c < v && c >= cap && c % unit == 0)
      REFUSE("kernel %s stage %d: knob %s=%d: beyond the extent rounded up (%lld), as %s=%d",
             k->name, si, name, v, (long long)cap, name, c);
  }
  *out = (int)cap;
  return CM_OK;
}

/* The tiles are checked on the stage as the point's K split leaves it (K per slice), then the
 * split is applied (cm_gemm_resplit: stages added or removed after si) and the tiles set. */
static cm_status apply_cpu_gemm(cm_kernel *k, int si, const cm_target *t, const cm_tune_space *sp,
                                const cm_tune_point *p, cm_err *err) {
  int cur = cm_gemm_k_split_at(k, si), split = value_of(sp, p, "k_split", cur > 0 ? cur : 1);
  cm_kstage probe = k->stages[si], *s = &probe;
  probe.red[0] = (cur > 0 ? cur * probe.red[0] : probe.red[0]) / split;
  cm_kgemm_tiles w = s->tiles;
  w.mr = value_of(sp, p, "mr", w.mr);
  w.nr = value_of(sp, p, "nr", w.nr);
  cm_status st = check_cpu_block(k, si, t, w.mr, w.nr, 64, 0, err);
  if (st != CM_OK) return st;
  int mc = value_of(sp, p, "mc", w.mc), nc = value_of(sp, p, "nc", w.nc);
  if (mc % w.mr || nc % w.nr)
    REFUSE("kernel %s stage %d: knob mc=%d / nc=%d: must be multiples of mr=%d / nr=%d", k->name,
           si, mc, nc, w.mr, w.nr);
  int64_t M = s->dom[s->n_dom - 2], N = s->dom[s->n_dom - 1], K = s->red[0];
  if ((st = clamp_tile(k, si, sp, "mc", mc, w.mr, round_up(M, w.mr), &w.mc, err)) != CM_OK ||
      (st = clamp_tile(k, si, sp, "nc", nc, w.nr, round_up(N, w.nr), &w.nc, err)) != CM_OK ||
      (st = clamp_tile(k, si, sp, "kc", value_of(sp, p, "kc", w.kc), 1, K, &w.kc, err)) != CM_OK)
    return st;
  s->tiles = w;
  int64_t ws = cm_kstage_workspace_bytes(s, CM_TARGET_CPU);
  if (ws > WORKSPACE_BUDGET)
    REFUSE("kernel %s stage %d: tiles mc %d nc %d kc %d: a %lld B workspace is over the %lld B "
           "budget",
           k->name, si, w.mc, w.nc, w.kc, (long long)ws, (long long)WORKSPACE_BUDGET);
  if (split != (cur > 0 ? cur : 1) && (st = cm_gemm_resplit(k, si, split, t, err)) != CM_OK)
    return st;
  k->stages[si].tiles = w;
  return CM_OK;
}

/* The point's register blocks of the span's later GEMM stages (knobs mr<r>, nr<r>) over the cost
 * model's; the workspace grows when their packing needs more. */
static cm_status apply_attn_stage_blocks(cm_kernel *k, int first, const cm_target *t,
                                         const cm_tune_space *sp, const cm_tune_point *p,
                                         cm_err *err) {
  cm_kstage *s0 = &k->stages[first];
  cm_kattn *a = &s0->attn;
  int W = t->vector_lanes, rs[2], n = attn_stage_knobs(k, first, rs);
  if (n == 0 || a->lanes != W) return CM_OK;
  for (int i = 0; i < n; i++) {
    char mname[16], nname[16];
    int mr, nr;
    attn_stage_block(s0, rs[i], W, &mr, &nr);
    snprintf(mname, sizeof mname, "mr%d", rs[i]);
    snprintf(nname, sizeof nname, "nr%d", rs[i]);
    mr = value_of(sp, p, mname, mr), nr = value_of(sp, p, nname, nr);
    /* attention.c's cost model searches blocks within 32 registers on every target: so do we */
    cm_status st = check_cpu_block(k, first + rs[i], t, mr, nr, 32, 32, err);
    if (st != CM_OK) return st;
    if (a->br < a->rows && a->br % mr)
      REFUSE("kernel %s stage %d: knob %s=%d: the span's blocks of br=%d rows are not whole "
             "register blocks",
             k->name, first + rs[i], mname, mr, a->br);
    a->mr[rs[i]] = (short)mr, a->nr[rs[i]] = (short)nr;
  }
  int smr[CM_KATTN_MAX_SPAN], snr[CM_KATTN_MAX_SPAN];
  for (int r = 0; r < a->span && r < CM_KATTN_MAX_SPAN; r++)
    attn_stage_block(s0, r, W, &smr[r], &snr[r]);
  int64_t am, bm, need = cm_kattn_pack_need(k, first, smr, snr, &am, &bm);
  if (need > a->ws_bytes) a->ws_bytes = need;
  return CM_OK;
}

static cm_status apply_cpu_attn(cm_kernel *k, int si, const cm_target *t, const cm_tune_space *sp,
                                const cm_tune_point *p, cm_err *err) {
  cm_kstage *s0 = &k->stages[si];
  cm_kstage saved = *s0;
  cm_kattn *a = &s0->attn;
  int mr = value_of(sp, p, "mr", s0->tiles.mr), nr = value_of(sp, p, "nr", s0->tiles.nr);
  int br = value_of(sp, p, "br", a->br), bc = value_of(sp, p, "bc", a->bc);
  /* the fused renderings take at most 32 accumulator vectors */
  cm_status st = check_cpu_block(k, si, t, mr, nr, 32, 0, err);
  if (st != CM_OK) return st;
  if (br < a->rows && br % mr)
    REFUSE("kernel %s stage %d: knob br=%d: a block of fewer than %lld rows must be whole "
           "register blocks of mr=%d",
           k->name, si, br, (long long)a->rows, mr);
  s0->tiles.mr = mr, s0->tiles.nr = nr;
  a->br = br, a->bc = bc;
  st = cm_kattn_check(k, si, err);
  if (st == CM_OK && a->stream) st = cm_kattn_stream_check(k, si, err);
  if (st != CM_OK) {
    *s0 = saved;
    return cm_err_prefix(err, "knob br=%d bc=%d: ", br, bc);
  }
  cm_kattn_replan(k, si, t->vector_lanes);
  if ((st = apply_attn_stage_blocks(k, si, t, sp, p, err)) != CM_OK) {
    *s0 = saved;
    return st;
  }
  bool fits = a->ws_bytes > 0 && a->ws_bytes <= WORKSPACE_BUDGET &&
              (a->stream || (a->whole_bytes > 0 && a->whole_bytes <= a->ws_bytes));
  if (!fits) {
    int64_t ws = a->ws_bytes;
    *s0 = saved;
    REFUSE("kernel %s stage %d: knobs mr=%d nr=%d br=%d bc=%d: a %lld B workspace (budget %lld B)",
           k->name, si, mr, nr, br, bc, (long long)ws, (long long)WORKSPACE_BUDGET);
  }
  return CM_OK;
}

/* Flash attention: a value other than the plan's refused when a smaller candidate already
 * covers the rows (forward) or keys (the same blocks, more idle threads), else cu_flash_refit's
 * checks. */
static cm_status apply_cuda_flash(cm_kernel *k, int si, space_kind kind, const cm_target *t,
                                  const cm_tune_space *sp, const cm_tune_point *p, cm_err *err) {
  cm_kcuda_attn *a = &k->stages[si].cuda.attn;
  int warps = value_of(sp, p, "warps", a->threads / 32), bc = value_of(sp, p, "bc", a->bc);
  int wk = knob_index(sp, "warps", 5), bk = knob_index(sp, "bc", 2);
  for (int i = 0; kind == SP_CUDA_FLASH && wk >= 0 && i < sp->knobs[wk].n_values; i++) {
    int w = sp->knobs[wk].values[i];
    if (w < warps && 16 * w >= a->rows && warps != a->threads / 32)
      REFUSE("kernel %s stage %d: knob warps=%d: %d query rows fit in blocks of warps=%d", k->name,
             si, warps, (int)a->rows, w);
  }
  for (int i = 0; bk >= 0 && i < sp->knobs[bk].n_values; i++) {
    int c = sp->knobs[bk].values[i];
    if (c < bc && c >= a->keys && bc != a->bc)
      REFUSE("kernel %s stage %d: knob bc=%d: %lld keys fit in blocks of bc=%d", k->name, si, bc,
             (long long)a->keys, c);
  }
  return cu_flash_refit(k, si, t, warps, bc, err);
}

static cm_status apply_cuda(cm_kernel *k, int si, space_kind kind, const cm_target *t,
                            const cm_tune_space *sp, const cm_tune_point *p, cm_err *err) {
  cm_kstage *s = &k->stages[si];
  cm_kstage saved = *s;
  cm_kcuda_gemm *g = &s->cuda.gemm;
  if (kind == SP_CUDA_MMA) {
    g->warps_m = value_of(sp, p, "warps_m", g->warps_m);
    g->warps_n = value_of(sp, p, "warps_n", g->warps_n);
    g->mr = value_of(sp, p, "mr", g->mr);
    g->nr = value_of(sp, p, "nr", g->nr);
    g->kc = value_of(sp, p, "kc", g->kc);
    g->stages = value_of(sp, p, "stages", g->stages);
    g->split_k = value_of(sp, p, "split_k", g->split_k);
    g->swizzle = value_of(sp, p, "swizzle", g->swizzle) != 0;
    if (g->mr * g->nr / 32 > MMA_MAX_ACC) {
      int mr = g->mr, nr = g->nr;
      *s = saved;
      REFUSE("kernel %s stage %d: knob mr x nr = %dx%d: %d accumulators a thread (at most %d "
             "within the launch bounds' 128 registers: spills)",
             k->name, si, mr, nr, mr * nr / 32, MMA_MAX_ACC);
    }
  } else if (kind == SP_CUDA_FMA) {
    cm_kgemm_tiles w = {value_of(sp, p, "mc", g->mc), value_of(sp, p, "nc", g->nc),
                        value_of(sp, p, "kc", g->kc), value_of(sp, p, "mr", g->mr),
                        value_of(sp, p, "nr", g->nr)};
    /* the plan as it is (its tiles may be the target's defaults when the stage's did not fit) */
    if (w.mc == g->mc && w.nc == g->nc && w.kc == g->kc && w.mr == g->mr && w.nr == g->nr)
      return CM_OK;
    s->tiles = w;
  } else if (kind == SP_CUDA_GENERIC) {
    s->cuda.red = (cm_kcuda_red)value_of(sp, p, "red", (int)s->cuda.red);
    s->cuda.block[0] = (unsigned)value_of(sp, p, "threads", (int)s->cuda.block[0]);
  } else {
    s->cuda.rows.warp = value_of(sp, p, "warp", s->cuda.rows.warp) != 0;
    s->cuda.rows.threads = value_of(sp, p, "threads", s->cuda.rows.threads);
  }
  cm_status st = cm_cuda_plan_refit(k, si, t, err);
  if (st != CM_OK) *s = saved;
  return st;
}

cm_status cm_tune_apply(cm_kernel *k, int stage, const cm_target *t, const cm_tune_point *p,
                        cm_err *err) {
  cm_status st = check_args(k, stage, t, "cm_tune_apply", err);
  if (st != CM_OK) return st;
  if (!p) return cm_errorf(err, CM_EINVALID, "cm_tune_apply: no point");
  cm_tune_space sp;
  st = cm_tune_space_of(k, stage, t, &sp, err);
  if (st != CM_OK) return st;
  for (int i = 0; i < sp.n_knobs; i++)
    if (!is_candidate(&sp.knobs[i], p->value[i]))
      REFUSE("kernel %s stage %d: knob %s=%d is not one of its candidates", k->name, stage,
             sp.knobs[i].name, p->value[i]);
  space_kind kind = kind_of(k, stage, t);
  switch (kind) {
  case SP_NONE: return CM_OK;
  case SP_CPU_GEMM: return apply_cpu_gemm(k, stage, t, &sp, p, err);
  case SP_CPU_ATTN: return apply_cpu_attn(k, stage, t, &sp, p, err);
  case SP_CUDA_FLASH:
  case SP_CUDA_FLASH_BWD: return apply_cuda_flash(k, stage, kind, t, &sp, p, err);
  default: return apply_cuda(k, stage, kind, t, &sp, p, err);
  }
}

/* ---- the structural hash ----------------------------------------------------------------- */

/* Four 64-bit lanes, each absorbing every word with its own constant and the splitmix64
 * finalizer: 256 bits, deterministic on every host. */
typedef struct shash {
  uint64_t h[4];
} shash;

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static void absorb(shash *x, uint64_t w) {
  static const uint64_t lane[4] = {0x9e3779b97f4a7c15ull, 0xc2b2ae3d27d4eb4full,
                                   0x165667b19e3779f9ull, 0xd6e8feb86659fd93ull};
  for (int i = 0; i < 4; i++) x->h[i] = mix64(x->h[i] ^ (w + lane[i] + (x->h[i] << 6)));
}

static void absorb_f64(shash *x, double v) {
  uint64_t w;
  memcpy(&w, &v, sizeof w);
  absorb(x, w);
}

/* Buffer numbers by first use (the stages' loads and stores in order); unused ones after. */
static void number_buffers(const cm_kernel *k, int *num) {
  int next = 0;
  for (int b = 0; b < k->n_buffers; b++) num[b] = -1;
  for (int si = 0; si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    for (int e = 0; e < s->n_exprs; e++) {
      int b = s->exprs[e].buf;
      if (s->exprs[e].kind == CM_KX_LOAD && b >= 0 && b < k->n_buffers && num[b] < 0)
        num[b] = next++;
    }
    for (int i = 0; i < s->n_stores; i++) {
      int b = s->stores[i].buf;
      if (b >= 0 && b < k->n_buffers && num[b] < 0) num[b] = next++;
    }
  }
  for (int b = 0; b < k->n_buffers; b++)
    if (num[b] < 0) num[b] = next++;
}

static uint64_t bufnum(const cm_kernel *k, const int *num, int b) {
  return b >= 0 && b < k->n_buffers ? (uint64_t)num[b] : (uint64_t)-1;
}

static void absorb_stage(shash *x, const cm_kernel *k, const int *num, const cm_kstage *s) {
  absorb(x, (uint64_t)s->n_dom);
  for (int v = 0; v < s->n_dom && v < CM_KMAX_VARS; v++) absorb(x, (uint64_t)s->dom[v]);
  absorb(x, (uint64_t)s->n_red);
  for (int v = 0; v < s->n_red && v < CM_KMAX_VARS; v++) absorb(x, (uint64_t)s->red[v]);
  absorb(x, (uint64_t)s->red_op * 64 + (uint64_t)s->acc_dtype);
  absorb(x, (uint64_t)s->body);
  absorb(x, (uint64_t)s->n_exprs);
  for (int e = 0; e < s->n_exprs; e++) {
    const cm_kexpr *q = &s->exprs[e];
    absorb(x, ((uint64_t)q->kind << 48) ^ ((uint64_t)q->op << 24) ^ (uint64_t)q->dtype);
    absorb(x, ((uint64_t)(uint32_t)q->a << 32) ^ (uint64_t)(uint32_t)q->b);
    absorb(x, ((uint64_t)(uint32_t)q->c << 32) ^ (uint64_t)(uint32_t)q->var);
    absorb(x, q->kind == CM_KX_LOAD ? bufnum(k, num, q->buf) : 0);
    absorb_f64(x, q->kind == CM_KX_CONST ? q->value : 0.0);
  }
  absorb(x, (uint64_t)s->n_stores);
  for (int i = 0; i < s->n_stores && i < CM_KMAX_STORES; i++) {
    absorb(x, bufnum(k, num, s->stores[i].buf));
    absorb(x, ((uint64_t)(uint32_t)s->stores[i].index << 32) ^ (uint32_t)s->stores[i].value);
  }
  absorb(x, (uint64_t)s->accumulate * 1024 + (uint64_t)s->n_parallel);
  absorb(x, ((uint64_t)s->tmpl << 40) ^ ((uint64_t)(uint32_t)s->gemm_a << 20) ^
                (uint64_t)(uint32_t)s->gemm_b);
  if (!is_attn(s)) return;
  /* the span's structure (not its tunables: br, bc, blocks, workspace) */
  const cm_kattn *a = &s->attn;
  absorb(x, ((uint64_t)a->span << 32) ^ ((uint64_t)a->nb << 8) ^ (uint64_t)a->stream);
  absorb(x, (uint64_t)a->rows);
  absorb(x, (uint64_t)a->n_local);
  for (int i = 0; i < a->n_local && i < CM_KATTN_MAX_LOCAL; i++) {
    absorb(x, bufnum(k, num, a->local[i]));
    absorb(x, (uint64_t)a->local_row[i]);
  }
}

void cm_kernel_structural_hash(const cm_kernel *k, char out[65]) {
  shash x = {
      {0x243f6a8885a308d3ull, 0x13198a2e03707344ull, 0xa4093822299f31d0ull, 0x082efa98ec4e6c89ull}};
  int *num = k && k->n_buffers > 0 ? malloc(sizeof(int) * (size_t)k->n_buffers) : NULL;
  if (k && (num || k->n_buffers <= 0)) {
    number_buffers(k, num);
    absorb(&x, (uint64_t)k->kind);
    absorb(&x, (uint64_t)k->n_buffers);
    for (int r = 0; r < k->n_buffers; r++) {
      int b = 0; /* buffer number r */
      while (num[b] != r) b++;
      const cm_kbuffer *kb = &k->buffers[b];
      absorb(&x, ((uint64_t)kb->kind << 32) ^ ((uint64_t)kb->dtype << 8) ^
                     ((uint64_t)kb->read << 1) ^ (uint64_t)kb->written);
      absorb(&x, (uint64_t)kb->numel);
    }
    absorb(&x, (uint64_t)k->n_stages);
    for (int si = 0; si < k->n_stages; si++) absorb_stage(&x, k, num, &k->stages[si]);
  } else {
    absorb(&x, 0);
  }
  free(num);
  for (int i = 0; i < 4; i++) snprintf(out + 16 * i, 17, "%016llx", (unsigned long long)x.h[i]);
}

/* ---- the cost model ---------------------------------------------------------------------- */

static double prod_ext(const int64_t *d, int n) {
  double p = 1;
  for (int i = 0; i < n; i++) p *= (double)d[i];
  return p;
}

/* The rows (cols) an extent n takes in blocks of b, the last block rounded up to r. */
static double padded(int64_t n, int64_t b, int64_t r) {
  int64_t nb = (n + b - 1) / b;
  return (double)((nb - 1) * b + round_up(n - (nb - 1) * b, r));
}

/* Cycles of an m x n x K GEMM in mr x nr register blocks of W-lane vectors: per k step the
 * FMAs (two a cycle), the broadcasts and B loads, the FMA latency when there are few
 * accumulators (4 cycles), and a store and a reload of every vector that does not fit the
 * registers (16, or 32 with AVX-512: accumulators, B vectors, a broadcast, and 4 for the loads
 * LLVM hoists from the next unrolled k step; on AVX2 9 x 24 spilled 120 vectors per 48 FMAs);
 * per block its C tile. The last panels' padding is paid in full. */
static double micro_cost(double blocks, int64_t K, int mr, int nr, int W, double extra_per_k) {
  double nv = (double)((nr + W - 1) / W), acc = mr * nv, regs = W >= 16 ? 32 : 16;
  double spilled = fmax(0, fmax(acc + nv + 1 - regs, acc + 4 - regs));
  double per_k = fmax(fmax(acc / 2, (mr + nv) / 2), 4) + 0.5 + extra_per_k + 2 * spilled;
  return blocks * ((double)K * per_k + acc + 8);
}

static double cost_cpu_gemm(const cm_kstage *s, const cm_target *t) {
  int W = t->vector_lanes > 0 ? t->vector_lanes : 1;
  cm_kgemm_tiles w = s->tiles;
  if (w.mr < 1 || w.nr < 1 || w.mc < w.mr || w.nc < w.nr || w.kc < 1) w = cm_cpu_gemm_defaults(W);
  double batch = prod_ext(s->dom, s->n_dom - 2);
  int64_t M = s->dom[s->n_dom - 2], N = s->dom[s->n_dom - 1], K = s->red[0];
  double Mp = padded(M, w.mc, w.mr), Np = padded(N, w.nc, w.nr);
  double mb = (double)((M + w.mc - 1) / w.mc), nb = (double)((N + w.nc - 1) / w.nc);
  /* a B micro-panel beyond L1 (32 KiB) or an A block beyond L2 (512 KiB) streams */
  double extra = ((int64_t)w.kc * w.nr * 4 > (32 << 10)) + ((int64_t)w.mc * w.kc * 4 > (512 << 10));
  double slices = (double)((K + w.kc - 1) / w.kc);
  double compute = micro_cost(batch * (Mp / w.mr) * (Np / w.nr), K, w.mr, w.nr, W, extra);
  compute += batch * (Mp / w.mr) * (Np / w.nr) * (slices - 1) * (w.mr * w.nr / W);
  /* packing: A once per column block, B once (its slices kept) or once per row block */
  bool keep_b = slices * w.kc * w.nc * 4 <= (4 << 20) || slices == 1;
  double pack = batch * (nb * Mp * K + (keep_b ? 1 : mb) * Np * K) / W * 1.5;
  return compute + pack + batch * (double)M * N / W * 2 + batch * mb * nb * 200;
}

static bool attn_gemm_stage(const cm_kattn *a, const cm_kstage *s, bool first) {
  return (first || s->tmpl == CM_KT_GEMM) && s->n_red == 1 && s->n_dom == a->nb + 2 &&
         s->acc_dtype == CM_F32 && s->gemm_a >= 0 && s->gemm_b >= 0;
}

static double cost_cpu_attn(const cm_kernel *k, int first, const cm_target *t) {
  const cm_kstage *s0 = &k->stages[first];
  const cm_kattn *a = &s0->attn;
  int W = t->vector_lanes > 0 ? t->vector_lanes : 1, nb = a->nb;
  double batch = prod_ext(s0->dom, nb);
  int64_t rows = a->rows, br = a->br > 0 && a->br < rows ? a->br : rows;
  int64_t keys = s0->dom[nb + 1], bc = a->stream && a->bc > 0 ? a->bc : keys;
  double nblk = (double)((rows + br - 1) / br), nkb = (double)((keys + bc - 1) / bc);
  double total = 0;
  for (int si = first; si < first + a->span && si < k->n_stages; si++) {
    const cm_kstage *s = &k->stages[si];
    int r = si - first;
    if (!attn_gemm_stage(a, s, si == first)) {
      total += prod_ext(s->dom, s->n_dom) * fmax(1, prod_ext(s->red, s->n_red)) / W * 2;
      continue;
    }
    int mr = s0->tiles.mr, nr = s0->tiles.nr;
    if (a->lanes == W && r < CM_KATTN_MAX_SPAN && a->mr[r] > 0 && a->nr[r] > 0)
      mr = a->mr[r], nr = a->nr[r];
    int64_t m = br < rows ? br : s->dom[nb], n = s->dom[nb + 1], K = s->red[0];
    double reps = br < rows ? nblk : 1;
    if (a->stream && n == keys)
      n = bc, reps *= nkb;
    else if (a->stream && K == keys)
      K = bc, reps *= nkb;
    double blocks = (double)((m + mr - 1) / mr) * (double)((n + nr - 1) / nr);
    total += batch * reps * micro_cost(blocks, K, mr, nr, W, 0);
  }
  /* a workspace beyond L2 (1 MiB) goes through memory once per block */
  if (a->ws_bytes > (1 << 20)) total += batch * nblk * (double)a->ws_bytes / 16;
  return total + batch * nblk * 100;
}

/* A modelled GPU: SMs, shared memory per SM, f32 FMAs and bf16 tensor-core FMAs per SM and
 * cycle, global memory bytes per cycle (the whole device). */
typedef struct gpu_model {
  double sms, smem_sm, fma_sm, mma_sm, bw;
} gpu_model;

static gpu_model gpu_of(const cm_target *t) {
  gpu_model g = {80, 96 << 10, 64, 512, 900};
  if (t->sm >= 80) g = (gpu_model){108, 164 << 10, 64, 1024, 1400};
  if (t->sm >= 90) g = (gpu_model){132, 228 << 10, 128, 2048, 2400};
  return g;
}

/* Blocks an SM holds: threads (2048), blocks (32), registers and shared memory. */
static double blocks_per_sm(const cm_target *t, const gpu_model *g, double threads, double regs,
                            double smem) {
  double b = fmin(floor(2048 / threads), 32);
  if (regs > 0) b = fmin(b, floor(t->regs_per_sm / (threads * regs)));
  if (smem > 0) b = fmin(b, floor(g->smem_sm / smem));
  return b < 1 ? 1 : b;
}

/* blocks of block_time cycles each (alone on an SM with enough warps to keep it busy), spread
 * over the SMs (the hardware starts a block wherever one ends); an SM holding fewer than 8 warps
 * (resident blocks x warps) runs below its rate. */
static double waves_time(const gpu_model *g, double blocks, double bps, double warps,
                         double block_time) {
  double per_sm = ceil(blocks / g->sms);
  double util = fmin(1, fmin(bps, per_sm) * warps / 8);
  return per_sm * block_time / util;
}

static double cost_cuda_gemm(const cm_kstage *s, const cm_target *t) {
  const cm_kcuda_gemm *p = &s->cuda.gemm;
  gpu_model g = gpu_of(t);
  if (p->mc < 1 || p->nc < 1 || p->kc < 1 || p->threads < 32) return 0;
  double Kp = (double)round_up(p->K, p->kc);
  double blocks = (double)p->batch * (double)((p->M + p->mc - 1) / p->mc) *
                  (double)((p->N + p->nc - 1) / p->nc);
  double warps = p->threads / 32.0, macs = (double)p->mc * p->nc * Kp, esz = 4, hide = 0.5;
  double compute, regs, smem;
  if (p->mma) {
    compute = macs / g.mma_sm * (p->swizzle ? 1 : 1.05);
    compute += (p->split_k - 1) * (double)p->mc * p->nc * 8 / 128; /* the sums in shared memory */
    esz = 2, hide = fmin(1, (p->stages - 1) / 2.0), regs = 128, smem = s->cuda.shared_dynamic;
  } else {
    double mt = p->tm * p->tn;
    compute = macs / (g.fma_sm * mt / (mt + p->tm + p->tn)) * (p->t == CM_F64 ? 8 : 1);
    esz = p->t == CM_F64 ? 8 : 4, regs = mt + 32, smem = (double)s->cuda.shared_static;
  }
  /* operands from L2 (3x the memory's rate), shared by the SMs */
  double mem = (p->mc + p->nc) * Kp * esz / (3 * g.bw / g.sms);
  double block_time =
      fmax(compute, mem / hide) + Kp / p->kc * 20 + (double)p->mc * p->nc / p->threads * 4;
  double bps = blocks_per_sm(t, &g, p->threads, regs, smem);
  return waves_time(&g, blocks, bps, warps, block_time) + 3000;
}

static double cost_cuda_rows(const cm_kernel *k, const cm_kstage *s, const cm_target *t) {
  const cm_kcuda_rows *r = &s->cuda.rows;
  gpu_model g = gpu_of(t);
  if (r->threads < 32 || r->rows_per_block < 1) return 0;
  double T = r->warp ? 32 : r->threads, row_time = 0, bytes = 0;
  for (int j = 0; j < r->span && j < CM_KCUDA_ROWS_MAX_SPAN; j++) {
    const cm_kstage *m = &k->stages[r->stage[j]];
    double work = prod_ext(m->dom, m->n_dom) * fmax(1, prod_ext(m->red, m->n_red));
    bytes += work * 4;
    row_time += ceil(work / (double)r->rows / T) * 4;
    if (m->n_red > 0) row_time += r->warp ? 20 : 20 + 8 * log2(T / 32) + 40;
  }
  double blocks = ceil((double)r->rows / r->rows_per_block), warps = r->threads / 32.0;
  double bps = blocks_per_sm(t, &g, r->threads, 32, (double)s->cuda.shared_static);
  double compute = waves_time(&g, blocks, bps, warps, row_time);
  /* the memory's rate needs 32 warps an SM in flight */
  double active = fmin(blocks, g.sms * bps) * warps;
  double mem = bytes / (g.bw * fmin(1, active / (g.sms * 32)));
  return fmax(compute, mem) + 3000;
}

/* A generic stage: a thread, warp or block per point (lanes), points strided over the grid; the
 * busiest thread's steps (its share of the reduction, a shuffle or tree of log2(lanes) steps),
 * issued 4 warp-instructions a cycle; every element read once from memory. */
static double cost_cuda_generic(const cm_kstage *s, const cm_target *t) {
  const cm_kcuda_plan *p = &s->cuda;
  gpu_model g = gpu_of(t);
  double points = prod_ext(s->dom, s->n_dom), red = fmax(1, prod_ext(s->red, s->n_red));
  double threads = fmax(32, p->block[0]), blocks = fmax(1, p->grid[0]);
  double lanes = p->red == CM_KCUDA_RED_BLOCK ? threads : p->red == CM_KCUDA_RED_WARP ? 32 : 1;
  double iters = ceil(points / (blocks * fmax(1, threads / lanes)));
  double steps = iters * (ceil(red / lanes) + (lanes > 1 ? 5 * log2(lanes) : 0) + 4);
  double bps = blocks_per_sm(t, &g, threads, 32, (double)p->shared_static);
  double compute = waves_time(&g, blocks, bps, threads / 32, threads / 32 * steps / 4);
  return fmax(compute, points * red * 4 / g.bw) + 3000;
}

/* Any other planned CUDA stage: its grid's blocks, each its share of the points x reduction. */
static double cost_cuda_other(const cm_kernel *k, int si, const cm_target *t) {
  const cm_kstage *s = &k->stages[si];
  const cm_kcuda_plan *p = &s->cuda;
  gpu_model g = gpu_of(t);
  double work = 0;
  int span = is_attn(s) ? s->attn.span : 1;
  for (int j = si; j < si + span && j < k->n_stages; j++)
    work += prod_ext(k->stages[j].dom, k->stages[j].n_dom) *
            fmax(1, prod_ext(k->stages[j].red, k->stages[j].n_red));
  double blocks = fmax(1, (double)p->grid[0] * p->grid[1] * p->grid[2]);
  double threads = fmax(32, (double)p->block[0] * p->block[1] * p->block[2]);
  double bps = blocks_per_sm(t, &g, threads, 64, (double)p->shared_static + p->shared_dynamic);
  double compute = waves_time(&g, blocks, bps, threads / 32, work / blocks / threads * 4);
  return fmax(compute, work * 4 / g.bw) + 3000;
}

double cm_tune_model_cost(const cm_kernel *k, int stage, const cm_target *t) {
  if (!k || !t || stage < 0 || stage >= k->n_stages || !k->stages) return 0;
  const cm_kstage *s = &k->stages[stage];
  if (t->kind == CM_TARGET_CPU) {
    if (in_attn_span(k, stage)) return 0;
    if (is_attn(s) && s->attn.span >= 2 && s->n_dom >= 2) return cost_cpu_attn(k, stage, t);
    if (cpu_gemm_stage(s)) return cost_cpu_gemm(s, t);
    int W = t->vector_lanes > 0 ? t->vector_lanes : 1;
    return prod_ext(s->dom, s->n_dom) * fmax(1, prod_ext(s->red, s->n_red)) / W * 2 + 100;
  }
  switch (s->cuda.kind) {
  case CM_KCUDA_NONE:
  case CM_KCUDA_IN_SPAN: return 0;
  case CM_KCUDA_GEMM: return cost_cuda_gemm(s, t);
  case CM_KCUDA_ROWS: return cost_cuda_rows(k, s, t);
  case CM_KCUDA_GENERIC: return cost_cuda_generic(s, t);
  default: return cost_cuda_other(k, stage, t);
  }
}
