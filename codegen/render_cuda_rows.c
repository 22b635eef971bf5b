/* codegen/render_cuda_rows.c — spans of row stages to one CUDA function (cm_kcuda_rows in
 * codegen.h): LayerNorm, softmax, BatchNorm and the loss rows, forward and backward, which
 * the lowering leaves as a few stages over the same rows (a reduction, then the stages that
 * read its per-row result). cu_plan_rows finds the longest run of consecutive stages that
 * share rows and touch, among the buffers the run writes, only their own row's slice;
 * cu_render_rows runs the stages in order inside one function, a warp (short rows) or a block
 * per row, each reduction a shuffle or block tree over the row's threads, per-row statistics
 * kept in registers, and a barrier only where a stage reads what another thread of the row
 * wrote. */
#include "render_cuda.h"

#include <stdlib.h>
#include <string.h>

#define ROWS_THREADS 256     /* per block, in either mode */
#define ROWS_WARP_MAX 1024   /* a warp per row when no stage does more per row */
#define ROWS_WORK_MAX 65536  /* per row and stage: points x reduction extent */
#define ROWS_SINGLE_MAX 4096 /* a span of one row runs on one block: only this much work */
#define ROWS_GRID_CAP 1048576
#define ROWS_MAX_SKIPPED 8      /* stages left out of a span that later members may pass */
#define ROWS_CACHE_MAX_SLOTS 32 /* registers per thread for one cached row slice */
#define AFF_BUDGET 4096

/* ---- the affine form of an index ---------------------------------------------- */

static int64_t var_extent(const cm_kstage *s, int v) {
  return v < s->n_dom ? s->dom[v] : s->red[v - s->n_dom];
}

/* The row stride C of the access at index expression e of stage s (row vars [r0, r0 + n))
 * in a span of `rows` rows: the index is high + C * row + low with 0 <= low < C and high a
 * multiple of C * rows, so rows never share an element. 0 with one row; -1 when unproven. */
static int64_t row_stride(const cm_kstage *s, int e, int r0, int n, int64_t rows) {
  if (rows == 1) return 0;
  cm_kaff f;
  int budget = AFF_BUDGET;
  if (!cm_kaff_of(s, e, &f, &budget)) return -1;
  int64_t C = -1, stride = 1, block;
  for (int i = n - 1; i >= 0; i--) {
    int v = r0 + i;
    if (s->dom[v] > 1) {
      if (f.c[v] <= 0 || f.c[v] % stride) return -1;
      if (C >= 0 && f.c[v] / stride != C) return -1;
      C = f.c[v] / stride;
    }
    f.c[v] = 0;
    stride *= s->dom[v];
  }
  if (C <= 0 || __builtin_mul_overflow(C, rows, &block)) return -1;
  for (int v = 0; v < s->n_dom + s->n_red; v++)
    if (f.c[v] % block == 0) f.c[v] = 0;
  f.c0 = (f.c0 % block + block) % block;
  int64_t lo, hi;
  cm_kaff_range(s, &f, &lo, &hi);
  return lo >= 0 && hi < C ? C : -1;
}

/* ---- the span ------------------------------------------------------------------- */

static bool stage_fits(const cm_kstage *s) {
  /* a collective stage is a host call between launches, never part of a function */
  if (s->coll.op != CM_KCOLL_NONE || s->accumulate || s->tmpl != CM_KT_NONE || s->n_dom < 0 ||
      s->n_red < 0 || s->n_dom + s->n_red > CM_KMAX_VARS || s->n_exprs < 0 ||
      (s->n_exprs && !s->exprs) || s->n_stores < 0 || s->n_stores > CM_KMAX_STORES)
    return false;
  for (int v = 0; v < s->n_dom + s->n_red; v++)
    if (var_extent(s, v) < 1) return false;
  cm_dtype a = s->acc_dtype;
  return s->n_red == 0 || (s->body >= 0 && s->body < s->n_exprs &&
                           (a == CM_F32 || a == CM_F64 || a == CM_I32 || a == CM_I64));
}

static bool stage_writes(const cm_kstage *s, int b) {
  for (int i = 0; i < s->n_stores; i++)
    if (s->stores[i].buf == b) return true;
  return false;
}

static bool stage_reads(const cm_kstage *s, int b) {
  for (int e = 0; e < s->n_exprs; e++)
    if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == b) return true;
  return false;
}

/* The common row stride of every access of stage s to buffer b (-2: none, -1: unproven or
 * not common). */
static int64_t stage_stride(const cm_kstage *s, int b, int r0, int n, int64_t rows, int64_t C) {
  for (int e = 0; e < s->n_exprs && C != -1; e++) {
    if (s->exprs[e].kind != CM_KX_LOAD || s->exprs[e].buf != b) continue;
    int64_t c = row_stride(s, s->exprs[e].a, r0, n, rows);
    C = C == -2 || C == c ? c : -1;
  }
  for (int i = 0; i < s->n_stores && C != -1; i++) {
    if (s->stores[i].buf != b) continue;
    int64_t c = row_stride(s, s->stores[i].index, r0, n, rows);
    C = C == -2 || C == c ? c : -1;
  }
  return C;
}

/* Whether every buffer the first `span` stages of p write, and more than one of them
 * accesses, is accessed in the row's own slice with one row stride; *stride_of (may be NULL)
 * receives that stride for buffer `want`. */
static bool span_local(const cm_kernel *k, int span, const cm_kcuda_rows *p, int want,
                       int64_t *stride_of) {
  for (int w = 0; w < span; w++) {
    const cm_kstage *sw = &k->stages[p->stage[w]];
    for (int i = 0; i < sw->n_stores; i++) {
      int b = sw->stores[i].buf, users = 0;
      if (b < 0 || b >= k->n_buffers) return false;
      int64_t C = -2;
      for (int j = 0; j < span; j++) {
        const cm_kstage *s = &k->stages[p->stage[j]];
        if (!stage_writes(s, b) && !stage_reads(s, b)) continue;
        users++;
        C = stage_stride(s, b, p->row_var[j], p->n_row_vars[j], p->rows, C);
      }
      if (users > 1 && C < 0) return false;
      if (b == want && stride_of) *stride_of = users > 1 ? C : -1;
    }
  }
  return true;
}

/* The n-th run of s's domain vars whose extents multiply to rows (shortest runs first). */
static bool row_run(const cm_kstage *s, int64_t rows, int nth, int *r0, int *n) {
  if (rows == 1) {
    *r0 = *n = 0;
    return nth == 0;
  }
  for (int len = 1; len <= s->n_dom; len++)
    for (int a = 0; a + len <= s->n_dom; a++)
      if (cu_prod(s->dom + a, len) == rows && nth-- == 0) {
        *r0 = a;
        *n = len;
        return true;
      }
  return false;
}

static int64_t stage_points(const cm_kstage *s, int64_t rows) {
  return cu_prod(s->dom, s->n_dom) / rows;
}

/* Whether a row of stage s (row vars [r0, r0 + n)) with several points is not contiguous:
 * its innermost domain var that is not 1 is a row var (a column of a [points, rows] layout). */
static bool strided_row(const cm_kstage *s, int r0, int n, int64_t rows) {
  if (stage_points(s, rows) <= 1) return false;
  int v = s->n_dom - 1;
  while (v >= 0 && s->dom[v] == 1) v--;
  return v >= r0 && v < r0 + n;
}

/* Whether stages a and b may run in either order: neither writes what the other accesses. */
static bool stages_commute(const cm_kstage *a, const cm_kstage *b) {
  for (int i = 0; i < a->n_stores; i++)
    if (stage_writes(b, a->stores[i].buf) || stage_reads(b, a->stores[i].buf)) return false;
  for (int i = 0; i < b->n_stores; i++)
    if (stage_reads(a, b->stores[i].buf)) return false;
  return true;
}

/* Stage s as member `span` of p (rows p->rows): its row vars, when some run of them keeps
 * every shared buffer row-local; false when none does. */
static bool join_span(const cm_kernel *k, int j, int span, cm_kcuda_rows *p) {
  int r0 = 0, n = 0;
  p->stage[span] = (short)j;
  for (int nth = 0; row_run(&k->stages[j], p->rows, nth, &r0, &n); nth++) {
    p->row_var[span] = (signed char)r0;
    p->n_row_vars[span] = (signed char)n;
    if (span_local(k, span + 1, p, -1, NULL)) return true;
  }
  return false;
}

/* The longest span from `first` over `rows` rows (members and row vars in p); its length. A
 * stage that cannot join is left to run after the span, when every later member commutes
 * with it; stages an earlier span claimed run before either. */
static int span_extend(const cm_kernel *k, int first, int64_t rows, const bool *claimed,
                       cm_kcuda_rows *p) {
  memset(p, 0, sizeof *p);
  p->rows = rows;
  int span = 0, skipped[ROWS_MAX_SKIPPED], n_skipped = 0;
  int64_t total = 0;
  bool column = false;
  for (int j = first; j < k->n_stages && span < CM_KCUDA_ROWS_MAX_SPAN; j++) {
    if (j > first && claimed[j]) continue;
    const cm_kstage *s = &k->stages[j];
    int64_t work = 0;
    bool joins = stage_fits(s);
    if (joins) {
      work = cu_prod(s->dom, s->n_dom) / rows * (s->n_red ? cu_prod(s->red, s->n_red) : 1);
      joins = work <= ROWS_WORK_MAX && (rows > 1 || total + work <= ROWS_SINGLE_MAX);
    }
    for (int i = 0; i < n_skipped && joins; i++) joins = stages_commute(&k->stages[skipped[i]], s);
    joins = joins && join_span(k, j, span, p);
    if (!joins) {
      if (j == first || n_skipped == ROWS_MAX_SKIPPED) break;
      skipped[n_skipped++] = j;
      continue;
    }
    total += work;
    if (work > p->row_work) p->row_work = work;
    column |= strided_row(s, p->row_var[span], p->n_row_vars[span], rows);
    span++;
  }
  bool reduces = false;
  for (int j = 0; j < span; j++) reduces |= k->stages[p->stage[j]].n_red > 0;
  /* a long strided row reads a sector per element where the stages alone ran along memory */
  if (column && p->row_work > ROWS_WARP_MAX) return 0;
  return span >= 2 && reduces ? span : 0;
}

/* Who computes a stage's points within the row (cm_kcuda_rows.mode). */
static signed char stage_mode(const cm_kstage *s, int64_t rows) {
  int64_t pts = stage_points(s, rows);
  if (pts == 1) return CM_KCUDA_ROWS_UNIFORM;
  if (s->n_red == 0 || cu_prod(s->red, s->n_red) <= pts) return CM_KCUDA_ROWS_POINTS;
  return CM_KCUDA_ROWS_COOP;
}

static int stat_index(const cm_kcuda_rows *p, int b) {
  for (int i = 0; i < p->n_stats; i++)
    if (p->stat_buf[i] == b) return i;
  return -1;
}

/* Row statistics: buffers of one element per row that only uniform stages of the span write
 * and a later stage reads; from their first writer on, the span reads a register. */
static void plan_stats(const cm_kernel *k, cm_kcuda_rows *p) {
  for (int w = 0; w < p->span; w++) {
    const cm_kstage *sw = &k->stages[p->stage[w]];
    for (int i = 0; i < sw->n_stores && p->n_stats < CM_KCUDA_ROWS_MAX_STATS; i++) {
      int b = sw->stores[i].buf;
      if (k->buffers[b].numel != p->rows || stat_index(p, b) >= 0) continue;
      bool ok = true, read_later = false;
      for (int j = 0; j < p->span; j++) {
        const cm_kstage *s = &k->stages[p->stage[j]];
        ok &= !stage_writes(s, b) || p->mode[j] == CM_KCUDA_ROWS_UNIFORM;
        read_later |= j > w && stage_reads(s, b);
      }
      int64_t C = -1;
      span_local(k, p->span, p, b, &C);
      if (!ok || !read_later || !(C == 1 || (p->rows == 1 && C == 0))) continue;
      p->stat_buf[p->n_stats] = b;
      p->stat_from[p->n_stats++] = (signed char)w;
    }
  }
}

/* Whether stage j reads buffer b from memory (not from a statistic's register). */
static int cached_index(const cm_kcuda_rows *p, int b) {
  for (int i = 0; i < p->n_cached; i++)
    if (p->cached_buf[i] == b) return i;
  return -1;
}

/* Whether stage j reads buffer b from memory (not from a statistic's or a slice's registers). */
static bool reads_memory(const cm_kernel *k, const cm_kcuda_rows *p, int j, int b) {
  int si = stat_index(p, b), ci = cached_index(p, b);
  return stage_reads(&k->stages[p->stage[j]], b) && !(si >= 0 && p->stat_from[si] < j) &&
         !(ci >= 0 && p->cached_from[ci] < j);
}

/* Whether index e of member j is C * row + the member's own place in the row + *c0: its point
 * p (the non-row domain vars, row-major) or, with `steps`, its reduction step q (the reduction
 * vars, row-major), the same c0 for every access (*c0 INT64_MIN: not yet known). */
static bool at_own_place(const cm_kstage *s, const cm_kcuda_rows *p, int j, int e, bool steps,
                         int64_t *c0) {
  cm_kaff f;
  int budget = AFF_BUDGET, r0 = p->row_var[j], r1 = r0 + p->n_row_vars[j];
  if (!cm_kaff_of(s, e, &f, &budget)) return false;
  int64_t stride = 1;
  for (int v = s->n_dom + s->n_red - 1; v >= 0; v--) {
    bool place = steps ? v >= s->n_dom : v < s->n_dom && (v < r0 || v >= r1);
    bool row = v < s->n_dom && v >= r0 && v < r1;
    if (place) {
      if (var_extent(s, v) > 1 && f.c[v] != stride) return false;
      stride *= var_extent(s, v);
    } else if (!row && var_extent(s, v) > 1 && f.c[v] != 0) {
      return false;
    }
  }
  if (*c0 != INT64_MIN && *c0 != f.c0) return false;
  *c0 = f.c0;
  return true;
}

/* Whether every load of b in member j is at its own place (see at_own_place). */
static bool loads_at_own_place(const cm_kstage *s, const cm_kcuda_rows *p, int j, int b, bool steps,
                               int64_t *c0) {
  for (int e = 0; e < s->n_exprs; e++)
    if (s->exprs[e].kind == CM_KX_LOAD && s->exprs[e].buf == b &&
        !at_own_place(s, p, j, s->exprs[e].a, steps, c0))
      return false;
  return true;
}

/* Whether buffer b, stored once by member w (a thread per point), can stay in registers: every
 * later member reading it reads at its own place, over as many places, and none writes it. */
static bool cacheable(const cm_kernel *k, const cm_kcuda_rows *p, int w, int b) {
  const cm_kstage *sw = &k->stages[p->stage[w]];
  int64_t pts = stage_points(sw, p->rows), c0 = INT64_MIN, T = p->warp ? 32 : p->threads;
  int stores = 0, index = -1, readers = 0;
  for (int i = 0; i < sw->n_stores; i++)
    if (sw->stores[i].buf == b) stores++, index = sw->stores[i].index;
  if (stores != 1 || (pts + T - 1) / T > ROWS_CACHE_MAX_SLOTS ||
      (p->n_cached && pts != p->cached_points) || !at_own_place(sw, p, w, index, false, &c0))
    return false;
  for (int j = w + 1; j < p->span; j++) {
    const cm_kstage *s = &k->stages[p->stage[j]];
    if (stage_writes(s, b)) return false;
    if (!stage_reads(s, b)) continue;
    readers++;
    bool points =
        p->mode[j] == CM_KCUDA_ROWS_POINTS && s->n_red == 0 && stage_points(s, p->rows) == pts;
    bool steps =
        p->mode[j] == CM_KCUDA_ROWS_UNIFORM && s->n_red > 0 && cu_prod(s->red, s->n_red) == pts;
    if (!(points || steps) || !loads_at_own_place(s, p, j, b, steps, &c0)) return false;
  }
  return readers > 0;
}

/* Row slices kept in registers (cm_kcuda_rows.cached_buf). Not in a span of one row: it is
 * small by construction, and its members are whole kernels' stages (the optimizer's norms over
 * thousands of buffers), where 24 more registers spilled. */
static void plan_cache(const cm_kernel *k, cm_kcuda_rows *p) {
  if (p->rows == 1) return;
  for (int w = 0; w < p->span; w++) {
    const cm_kstage *sw = &k->stages[p->stage[w]];
    if (p->mode[w] != CM_KCUDA_ROWS_POINTS || sw->n_red > 0) continue;
    for (int i = 0; i < sw->n_stores && p->n_cached < CM_KCUDA_ROWS_MAX_CACHED; i++) {
      int b = sw->stores[i].buf;
      if (stat_index(p, b) >= 0 || cached_index(p, b) >= 0 || !cacheable(k, p, w, b)) continue;
      p->cached_points = stage_points(sw, p->rows);
      p->cached_buf[p->n_cached] = b;
      p->cached_from[p->n_cached++] = (signed char)w;
    }
  }
  for (int j = 0; j < p->span; j++) {
    const cm_kstage *s = &k->stages[p->stage[j]];
    for (int i = 0; i < p->n_cached; i++)
      p->unrolled[j] |=
          (p->cached_from[i] == j) || (p->cached_from[i] < j && stage_reads(s, p->cached_buf[i]));
  }
}

/* Stage j after stage a with no barrier between them races when one writes what the other
 * accesses through memory (a cooperative reduction's own barrier ends its reads). */
static bool stages_race(const cm_kernel *k, const cm_kcuda_rows *p, int a, int j) {
  const cm_kstage *sa = &k->stages[p->stage[a]], *sj = &k->stages[p->stage[j]];
  bool a_synced = p->mode[a] == CM_KCUDA_ROWS_UNIFORM && sa->n_red > 0;
  for (int b = 0; b < k->n_buffers; b++) {
    bool wa = stage_writes(sa, b), wj = stage_writes(sj, b);
    if (wa && (wj || reads_memory(k, p, j, b))) return true;
    if (wj && !a_synced && reads_memory(k, p, a, b)) return true;
  }
  return false;
}

static void plan_syncs(const cm_kernel *k, cm_kcuda_rows *p) {
  int since = 0; /* the first stage after the last barrier */
  for (int j = 1; j < p->span; j++) {
    bool race = false;
    for (int a = since; a < j && !race; a++) race = stages_race(k, p, a, j);
    p->sync_before[j] = race;
    if (race) since = j;
  }
}

bool cu_plan_rows(const cm_kernel *k, int first, const cm_target *t, const bool *claimed,
                  cm_kcuda_rows *out) {
  const cm_kstage *s0 = &k->stages[first];
  if (!stage_fits(s0)) return false;
  cm_kcuda_rows best, cand;
  memset(&best, 0, sizeof best);
  /* candidate row counts: the first stage's runs of domain vars, and one row */
  for (int len = 0; len <= s0->n_dom; len++)
    for (int a = 0; a + len <= s0->n_dom && (len > 0 || a == 0); a++) {
      int64_t rows = cu_prod(s0->dom + a, len);
      if (rows < 1 || (len > 0 && rows == 1)) continue;
      int span = span_extend(k, first, rows, claimed, &cand);
      /* the most rows (parallelism), then the longest span */
      if (span && (!best.span || rows > best.rows || (rows == best.rows && span > best.span))) {
        cand.span = span;
        best = cand;
      }
    }
  if (!best.span) return false;
  for (int j = 0; j < best.span; j++)
    best.mode[j] = stage_mode(&k->stages[best.stage[j]], best.rows);
  plan_stats(k, &best);
  best.warp = best.row_work <= ROWS_WARP_MAX;
  best.threads = ROWS_THREADS;
  best.rows_per_block = best.warp ? ROWS_THREADS / t->warp_size : 1;
  plan_cache(k, &best);
  plan_syncs(k, &best);
  *out = best;
  return true;
}

void cu_rows_refit(const cm_kernel *k, cm_kcuda_rows *r, const cm_target *t) {
  r->rows_per_block = r->warp ? r->threads / t->warp_size : 1;
  r->n_cached = 0;
  r->cached_points = 0;
  memset(r->cached_buf, 0, sizeof r->cached_buf);
  memset(r->cached_from, 0, sizeof r->cached_from);
  memset(r->unrolled, 0, sizeof r->unrolled);
  memset(r->sync_before, 0, sizeof r->sync_before);
  plan_cache(k, r);
  plan_syncs(k, r);
}

/* The launch and shared memory of a rows plan (a partial per warp and accumulator type in
 * block mode). */
void cu_rows_launch(const cm_kernel *k, const cm_kcuda_rows *r, unsigned grid[3], unsigned block[3],
                    int64_t *shared) {
  int64_t g = (r->rows + r->rows_per_block - 1) / r->rows_per_block;
  grid[0] = (unsigned)(g < ROWS_GRID_CAP ? g : ROWS_GRID_CAP);
  block[0] = (unsigned)r->threads;
  *shared = 0;
  if (r->warp) return;
  bool used[4] = {false, false, false, false}; /* float, double, int, long long */
  for (int j = 0; j < r->span; j++) {
    const cm_kstage *s = &k->stages[r->stage[j]];
    if (s->n_red == 0 || r->mode[j] == CM_KCUDA_ROWS_POINTS) continue;
    cm_dtype a = s->acc_dtype;
    used[a == CM_F64 ? 1 : a == CM_I32 ? 2 : a == CM_I64 ? 3 : 0] = true;
  }
  static const int size[4] = {4, 8, 4, 8};
  for (int i = 0; i < 4; i++)
    if (used[i]) *shared += (int64_t)size[i] * (r->threads / 32);
}

/* ---- rendering ---------------------------------------------------------------------- */

static const char *part_name(cm_dtype a) {
  return a == CM_F64 ? "cm_rpd_" : a == CM_I32 ? "cm_rpi_" : a == CM_I64 ? "cm_rpl_" : "cm_rpf_";
}

/* The row's threads reduce into acc: each its share of the reduction, then a butterfly of
 * shuffles (every lane ends with the same value), and with a block per row the warps'
 * partials combined in one order by every thread. */
static void emit_coop_reduce(rctx *c, const cm_kcuda_rows *p, bool unrolled, const char *ind) {
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  char init[128], comb[256], body[256], bname[32], ind2[32], pv[32];
  snprintf(ind2, sizeof ind2, "%s  ", ind);
  int64_t rext = cu_prod(s->red, s->n_red);
  cu_acc_init(s, init, sizeof init);
  cu_sb_printf(o, "%s%s acc = %s;\n", ind, cu_ctype(s->acc_dtype), init);
  int T = p->warp ? 32 : p->threads;
  if (unrolled) /* by register slot: step q of the row is slot q / T of thread q % T */
    cu_sb_printf(o,
                 "%s#pragma unroll\n%sfor (int i_ = 0; i_ < %lld; i_++) {\n"
                 "%s  const int q = tid_ + i_ * %d;\n%s  if (q < %lld) {\n",
                 ind, ind, (long long)((rext + T - 1) / T), ind, T, ind, (long long)rext);
  else
    cu_sb_printf(o, "%sfor (%s q = tid_; q < %lldLL; q += %d) {\n", ind, cu_red_counter_type(rext),
                 (long long)rext, T);
  cu_decompose(c, ind2, "q", s->n_dom, s->red, s->n_red);
  cu_clear_mark(c);
  cu_mark_from(c, s->body);
  cu_emit_marked(c, ind2, "acc", 1, -1);
  snprintf(bname, sizeof bname, "e%d", s->body);
  cu_cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
  cu_acc_combine(s, "acc", body, comb, sizeof comb);
  cu_sb_printf(o, "%sacc = %s;\n%s}\n", ind2, comb, ind);
  if (unrolled) cu_sb_printf(o, "%s}\n", ind);
  for (int e = 0; e < s->n_exprs; e++)
    if (c->usered[e]) c->done[e] = false;
  cu_acc_combine(s, "acc", "__shfl_xor_sync(0xffffffffu, acc, o_)", comb, sizeof comb);
  cu_sb_printf(o, "%sfor (int o_ = 16; o_ > 0; o_ >>= 1) acc = %s;\n", ind, comb);
  if (p->warp) return;
  const char *part = part_name(s->acc_dtype);
  snprintf(pv, sizeof pv, "%s[w_]", part);
  cu_acc_combine(s, "acc", pv, comb, sizeof comb);
  cu_sb_printf(o,
               "%sif ((threadIdx.x & 31) == 0) %s[threadIdx.x >> 5] = acc;\n"
               "%s__syncthreads();\n"
               "%sacc = %s[0];\n"
               "%sfor (int w_ = 1; w_ < %d; w_++) acc = %s;\n"
               "%s__syncthreads(); // the partials are free again\n",
               ind, part, ind, ind, part, ind, p->threads / 32, comb, ind);
}

/* A uniform stage's stores: every thread computes them, the first stores to memory, and a
 * row statistic also goes to its register. */
static void emit_lead_stores(rctx *c, const cm_kcuda_rows *p, const char *ind) {
  const cm_kstage *s = c->s;
  cu_clear_mark(c);
  for (int i = 0; i < s->n_stores; i++) {
    cu_mark_from(c, s->stores[i].index);
    cu_mark_from(c, s->stores[i].value);
  }
  cu_emit_marked(c, ind, "acc", -1, -1);
  char v[32], cv[512];
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cm_dtype bd = c->k->buffers[st->buf].dtype;
    snprintf(v, sizeof v, "e%d", st->value);
    cu_cast_code(cv, sizeof cv, s->exprs[st->value].dtype, bd, v);
    if (bd == CM_BF16)
      cu_sb_printf(c->o, "%sconst cm_bf16_t sv%d = cm_f2bf(%s);\n", ind, i, cv);
    else if (bd == CM_F16)
      cu_sb_printf(c->o, "%sconst cm_f16_t sv%d = cm_f2h(%s);\n", ind, i, cv);
    else if (bd == CM_BOOL)
      cu_sb_printf(c->o, "%sconst unsigned char sv%d = (%s) ? 1 : 0;\n", ind, i, cv);
    else
      cu_sb_printf(c->o, "%sconst %s sv%d = %s;\n", ind, cu_stype(bd), i, cv);
  }
  for (int i = 0; i < s->n_stores; i++) {
    const cm_kstore *st = &s->stores[i];
    cu_sb_printf(c->o, "%sif (lead_) b%d[e%d] = sv%d;\n", ind, st->buf, st->index, i);
    if (stat_index(p, st->buf) >= 0) cu_sb_printf(c->o, "%srg%d_ = sv%d;\n", ind, st->buf, i);
  }
}

/* A thread's serial reduction into acc (a thread per point). */
static void emit_serial_reduce(rctx *c, const char *ind) {
  const cm_kstage *s = c->s;
  char init[128], comb[256], body[256], bname[32], ind2[32];
  snprintf(ind2, sizeof ind2, "%s  ", ind);
  int64_t rext = cu_prod(s->red, s->n_red);
  cu_acc_init(s, init, sizeof init);
  cu_sb_printf(c->o, "%s%s acc = %s;\n%sfor (%s q = 0; q < %lldLL; q++) {\n", ind,
               cu_ctype(s->acc_dtype), init, ind, cu_red_counter_type(rext), (long long)rext);
  cu_decompose(c, ind2, "q", s->n_dom, s->red, s->n_red);
  cu_clear_mark(c);
  cu_mark_from(c, s->body);
  cu_emit_marked(c, ind2, "acc", 1, -1);
  snprintf(bname, sizeof bname, "e%d", s->body);
  cu_cast_code(body, sizeof body, s->exprs[s->body].dtype, s->acc_dtype, bname);
  cu_acc_combine(s, "acc", body, comb, sizeof comb);
  cu_sb_printf(c->o, "%sacc = %s;\n%s}\n", ind2, comb, ind);
  for (int e = 0; e < s->n_exprs; e++)
    if (c->usered[e]) c->done[e] = false;
}

/* Stage j of the span inside the row loop (row_ is the row). */
static void render_row_stage(rctx *c, const cm_kcuda_rows *p, int j) {
  static const char *const mode_name[] = {"uniform", "a thread per point", "cooperative"};
  const cm_kstage *s = c->s;
  sbuf *o = c->o;
  int r0 = p->row_var[j], n = p->n_row_vars[j], mode = p->mode[j], r1 = r0 + n;
  int64_t pts = stage_points(s, p->rows), post = cu_prod(s->dom + r1, s->n_dom - r1);
  cu_sb_printf(o, "    { // stage %d \"%s\" (%s)\n", c->si, s->name, mode_name[mode]);
  cu_decompose(c, "    ", "row_", r0, s->dom + r0, n);
  memset(c->done, 0, (size_t)s->n_exprs * sizeof *c->done);
  const char *ind = "    ";
  if (mode == CM_KCUDA_ROWS_UNIFORM) {
    for (int v = 0; v < s->n_dom; v++)
      if (v < r0 || v >= r1) cu_sb_printf(o, "    const long long v%d = 0;\n", v);
  } else {
    int T = p->warp ? 32 : p->threads;
    if (mode == CM_KCUDA_ROWS_POINTS && p->unrolled[j]) /* point p_ is slot p_ / T */
      cu_sb_printf(o,
                   "    #pragma unroll\n    for (int i_ = 0; i_ < %lld; i_++) {\n"
                   "    const int p_ = tid_ + i_ * %d;\n    if (p_ < %lld) {\n",
                   (long long)((pts + T - 1) / T), T, (long long)pts);
    else if (mode == CM_KCUDA_ROWS_POINTS)
      cu_sb_printf(o, "    for (int p_ = tid_; p_ < %lld; p_ += %d) {\n", (long long)pts, T);
    else
      cu_sb_printf(o, "    for (int p_ = 0; p_ < %lld; p_++) {\n", (long long)pts);
    ind = "      ";
    if (r0 > 0) {
      cu_sb_printf(o, "%sconst int pq_ = p_ / %lld;\n", ind, (long long)post);
      cu_decompose(c, ind, "pq_", 0, s->dom, r0);
    }
    if (r1 < s->n_dom) {
      cu_sb_printf(o, "%sconst int pr_ = p_ %% %lld;\n", ind, (long long)post);
      cu_decompose(c, ind, "pr_", r1, s->dom + r1, s->n_dom - r1);
    }
  }
  cu_clear_mark(c);
  if (s->n_red > 0) cu_mark_from(c, s->body);
  for (int i = 0; i < s->n_stores; i++) {
    cu_mark_from(c, s->stores[i].index);
    cu_mark_from(c, s->stores[i].value);
  }
  cu_emit_marked(c, ind, "acc", 0, 0);
  if (mode == CM_KCUDA_ROWS_POINTS) {
    if (s->n_red > 0) emit_serial_reduce(c, ind);
    cu_emit_stores(c, ind, "acc");
    for (int i = 0; i < s->n_stores; i++) {
      int ci = cached_index(p, s->stores[i].buf);
      if (ci >= 0 && p->cached_from[ci] == j)
        cu_sb_printf(o, "%src%d_[i_] = sv%d;\n", ind, s->stores[i].buf, i);
    }
    if (p->unrolled[j]) cu_sb_printf(o, "    }\n");
  } else {
    if (s->n_red > 0) emit_coop_reduce(c, p, p->unrolled[j], ind);
    if (mode == CM_KCUDA_ROWS_UNIFORM) {
      emit_lead_stores(c, p, ind);
    } else {
      cu_sb_printf(o, "%sif (lead_) {\n", ind);
      cu_emit_stores(c, "        ", "acc");
      cu_sb_printf(o, "%s}\n", ind);
    }
  }
  if (mode != CM_KCUDA_ROWS_UNIFORM) cu_sb_printf(o, "    }\n");
  cu_sb_printf(o, "    }\n");
}

/* A stage that runs in another stage's function: an empty one of its own. */
cm_status cu_render_span_stub(const cm_kernel *k, int si, int first, sbuf *o, const bool *written,
                              cm_err *err) {
  rctx c;
  cm_status st = cu_rctx_open(&c, k, si, o, err);
  if (st == CM_OK) {
    cu_sb_printf(o, "// stage %d \"%s\" (runs in stage %d)\n", si, k->stages[si].name, first);
    cu_signature(&c, written, "");
    cu_sb_printf(o, "}\n\n");
  }
  cu_rctx_close(&c);
  return st;
}

/* The function head: partials, the thread's place in its row, the row loop, the statistics'
 * registers. */
static void rows_head(const cm_kernel *k, const cm_kcuda_rows *p, sbuf *o) {
  if (!p->warp) {
    bool used[4] = {false, false, false, false};
    static const char *const type[4] = {"float", "double", "int", "long long"};
    static const cm_dtype dt[4] = {CM_F32, CM_F64, CM_I32, CM_I64};
    for (int j = 0; j < p->span; j++) {
      const cm_kstage *s = &k->stages[p->stage[j]];
      if (s->n_red == 0 || p->mode[j] == CM_KCUDA_ROWS_POINTS) continue;
      cm_dtype a = s->acc_dtype;
      used[a == CM_F64 ? 1 : a == CM_I32 ? 2 : a == CM_I64 ? 3 : 0] = true;
    }
    for (int i = 0; i < 4; i++)
      if (used[i])
        cu_sb_printf(o, "  __shared__ %s %s[%d];\n", type[i], part_name(dt[i]), p->threads / 32);
    cu_sb_printf(o,
                 "  const int tid_ = threadIdx.x;\n"
                 "  for (long long row_ = blockIdx.x; row_ < %lldLL; row_ += gridDim.x) {\n",
                 (long long)p->rows);
  } else {
    cu_sb_printf(o,
                 "  const int tid_ = threadIdx.x & 31;\n"
                 "  for (long long row_ = (long long)blockIdx.x * %d + (threadIdx.x >> 5); row_ < "
                 "%lldLL;\n       row_ += (long long)gridDim.x * %d) {\n",
                 p->rows_per_block, (long long)p->rows, p->rows_per_block);
  }
  cu_sb_printf(o, "    const bool lead_ = tid_ == 0;\n    (void)lead_;\n");
  for (int i = 0; i < p->n_stats; i++)
    cu_sb_printf(o, "    %s rg%d_ = 0;\n", cu_stype(k->buffers[p->stat_buf[i]].dtype),
                 p->stat_buf[i]);
  int64_t T = p->warp ? 32 : p->threads;
  for (int i = 0; i < p->n_cached; i++)
    cu_sb_printf(o, "    %s rc%d_[%lld];\n", cu_stype(k->buffers[p->cached_buf[i]].dtype),
                 p->cached_buf[i], (long long)((p->cached_points + T - 1) / T));
}

/* A plan the renderer can follow (a stored or tuned one may be anything): members in order
 * inside the kernel, each a stage that fits with row vars inside its domain, threads whole
 * warps, a warp per row exactly when rows_per_block warps fill the block. */
static cm_status check_plan(const cm_kernel *k, int first, const cm_kcuda_rows *p, cm_err *err) {
  const char *rule = NULL;
  if (p->span < 1 || p->span > CM_KCUDA_ROWS_MAX_SPAN || p->stage[0] != first || p->rows < 1)
    rule = "its members do not start at this stage";
  else if (p->threads < 32 || p->threads > 1024 || p->threads % 32 ||
           (p->warp ? p->rows_per_block * 32 != p->threads : p->rows_per_block != 1))
    rule = "threads and rows per block disagree";
  else if (p->n_stats < 0 || p->n_stats > CM_KCUDA_ROWS_MAX_STATS)
    rule = "too many statistics";
  for (int j = 0; j < p->span && !rule; j++) {
    int si = p->stage[j], r0 = p->row_var[j], n = p->n_row_vars[j];
    if (si < first || si >= k->n_stages || (j && si <= p->stage[j - 1]))
      rule = "its members are not stages of the kernel in order";
    else if (!stage_fits(&k->stages[si]) || r0 < 0 || n < 0 || r0 + n > k->stages[si].n_dom ||
             cu_prod(k->stages[si].dom + r0, n) != p->rows || p->mode[j] < 0 || p->mode[j] > 2 ||
             (p->mode[j] == CM_KCUDA_ROWS_UNIFORM && stage_points(&k->stages[si], p->rows) != 1))
      rule = "a member's row vars or mode do not fit it";
  }
  int64_t T = p->warp ? 32 : p->threads;
  if (!rule && (p->n_cached < 0 || p->n_cached > CM_KCUDA_ROWS_MAX_CACHED ||
                (p->n_cached &&
                 (p->cached_points < 1 || (p->cached_points + T - 1) / T > ROWS_CACHE_MAX_SLOTS))))
    rule = "its cached row slices do not fit";
  for (int i = 0; i < p->n_cached && !rule; i++)
    if (p->cached_buf[i] < 0 || p->cached_buf[i] >= k->n_buffers || p->cached_from[i] < 0 ||
        p->cached_from[i] >= p->span)
      rule = "a cached row slice is not a buffer a member writes";
  for (int j = 0; j < p->span && !rule; j++) {
    const cm_kstage *s = &k->stages[p->stage[j]];
    int64_t places =
        p->mode[j] == CM_KCUDA_ROWS_UNIFORM ? cu_prod(s->red, s->n_red) : stage_points(s, p->rows);
    if (p->unrolled[j] && (p->mode[j] == CM_KCUDA_ROWS_COOP || places != p->cached_points))
      rule = "a member looping by register slot has another number of places";
  }
  for (int i = 0; i < p->n_stats && !rule; i++)
    if (p->stat_buf[i] < 0 || p->stat_buf[i] >= k->n_buffers ||
        k->buffers[p->stat_buf[i]].numel != p->rows)
      rule = "a statistic is not one element per row";
  if (!rule) return CM_OK;
  return cm_errorf(err, CM_EINVALID, "kernel %s stage %d: the row span's plan: %s", k->name, first,
                   rule);
}

cm_status cu_render_rows(const cm_kernel *k, int first, const cm_kcuda_rows *p, int min_blocks,
                         sbuf *o, const bool *written, cm_err *err) {
  cm_status st = check_plan(k, first, p, err);
  if (st != CM_OK) return st;
  rctx c0;
  st = cu_rctx_open(&c0, k, first, o, err);
  if (st == CM_OK) {
    cu_sb_printf(o, "// stages");
    for (int j = 0; j < p->span; j++) cu_sb_printf(o, "%s %d", j ? "," : "", p->stage[j]);
    cu_sb_printf(o, " (rows: %lld rows, a %s per row)\n", (long long)p->rows,
                 p->warp ? "warp" : "block");
    char bounds[64];
    cu_launch_bounds(p->threads, min_blocks, bounds, sizeof bounds);
    cu_signature(&c0, written, bounds);
  }
  cu_rctx_close(&c0);
  if (st != CM_OK) return st;
  const char **subst = calloc((size_t)k->n_buffers + 1, sizeof *subst);
  char names[CM_KCUDA_ROWS_MAX_STATS][24], cnames[CM_KCUDA_ROWS_MAX_CACHED][32];
  if (!subst) return cm_errorf(err, CM_EINTERNAL, "kernel %s: out of memory", k->name);
  rows_head(k, p, o);
  for (int j = 0; j < p->span && st == CM_OK; j++) {
    if (p->sync_before[j])
      cu_sb_printf(o, "    %s;\n", p->warp ? "__syncwarp()" : "__syncthreads()");
    for (int i = 0; i < p->n_stats; i++)
      if (p->stat_from[i] < j) {
        snprintf(names[i], sizeof names[i], "rg%d_", p->stat_buf[i]);
        subst[p->stat_buf[i]] = names[i];
      }
    for (int i = 0; i < p->n_cached; i++)
      if (p->cached_from[i] < j) {
        snprintf(cnames[i], sizeof cnames[i], "rc%d_[i_]", p->cached_buf[i]);
        subst[p->cached_buf[i]] = cnames[i];
      }
    rctx c;
    st = cu_rctx_open(&c, k, p->stage[j], o, err);
    c.subst = subst;
    if (st == CM_OK) render_row_stage(&c, p, j);
    if (st == CM_OK) st = c.st;
    cu_rctx_close(&c);
  }
  free(subst);
  cu_sb_printf(o, "  }\n}\n\n");
  return st;
}
