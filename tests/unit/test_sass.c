/* tests/unit/test_sass.c — the SASS check of issue 16 (item 5): every GEMM and attention
 * kernel of the ViT-B bf16 training step, compiled for sm_80 and sm_90 through NVRTC,
 *   spill   spills no registers (ptxas),
 *   stats   has the ptxas figures (registers, shared memory) that `cmaec compile --emit stats`
 *           prints for it (the same cm_cubin_kernel lookup),
 *   tensor  has tensor-core instructions in its SASS (HMMA; HGMMA on a wgmma path), read with
 *           cuobjdump -sass.
 * The step is cmae_vit_base's (AdamW, EMA) through the autocast pass (bf16) and the default
 * pipeline, lowered for each arch; a contraction stage is a GEMM or attention template's,
 * whatever the CUDA plan made of it (GEMM on mma.sync or FMA, a fused, streaming or flash
 * span, a generic loop); only the kernels holding one are rendered and compiled, those whose
 * CUDA C is the same up to the kernel's name once.
 * Every contraction stage of every kernel is listed with its figures and a verdict per rule;
 * spill and stats are asserted for every stage, tensor for every GEMM stage and forward span,
 * and for the backward spans once HMMA_REQUIRED_BACKWARD says so (see there).
 * Tile choices depend on the shapes, so there are two tests: batch 2 (CI) and batch 128 (the
 * realistic batch; long). cuobjdump: $CMAEC_CUOBJDUMP, else on PATH, else the toolkit's, else
 * the Python package nvidia-cuda-cuobjdump's (scripts/install-deps.sh installs it, with
 * nvidia-cuda-nvdisasm, which cuobjdump -sass runs). Exit 77 (skipped) only without NVRTC. */
#include "../test.h"
#include "../model_step.h"
#include "codegen/codegen.h"
#include "models/models.h"
#include "passes/passes.h"
#include "runtime/runtime.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MODEL "models/cmae_vit_base.json"
#define N_THREADS 2
static const char *const ARCHS[] = {"sm_80", "sm_90"};
#define N_ARCHS 2

/* Whether the backward attention spans (the flash backward) must show tensor-core
 * instructions too: all five products on mma.sync (render_cuda_flash.c). */
#define HMMA_REQUIRED_BACKWARD true

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static cm_nvrtc *nvrtc;
static char cuobjdump[4096]; /* the command: "PATH=DIR:$PATH 'BIN'" or "'BIN'" */

/* s with every `from` replaced by `to` (malloc'ed). */
static char *replace_all(const char *s, const char *from, const char *to) {
  size_t fl = strlen(from), tl = strlen(to), n = 0;
  for (const char *p = strstr(s, from); p; p = strstr(p + fl, from)) n++;
  char *out = malloc(strlen(s) + n * (tl > fl ? tl - fl : 0) + 1), *o = out;
  if (!out) return NULL;
  for (const char *p = s, *q; (q = strstr(p, from)) || *p; p = q + fl) {
    size_t len = q ? (size_t)(q - p) : strlen(p);
    memcpy(o, p, len), o += len;
    if (!q) break;
    memcpy(o, to, tl), o += tl;
  }
  *o = 0;
  return out;
}

/* The first line of a command's output (popen), or "" */
static void first_line(const char *cmd, char *out, size_t size) {
  out[0] = 0;
  FILE *p = popen(cmd, "r");
  if (!p) return;
  if (!fgets(out, (int)size, p)) out[0] = 0;
  pclose(p);
  out[strcspn(out, "\n")] = 0;
}

/* Finds cuobjdump (see the top); false when there is none. */
static bool find_cuobjdump(void) {
  char path[4096] = "";
  const char *env = getenv("CMAEC_CUOBJDUMP");
  if (env && env[0]) snprintf(path, sizeof path, "%s", env);
  if (!path[0]) first_line("command -v cuobjdump 2>/dev/null", path, sizeof path);
  if (!path[0] && access("/usr/local/cuda/bin/cuobjdump", X_OK) == 0)
    snprintf(path, sizeof path, "/usr/local/cuda/bin/cuobjdump");
  if (!path[0])
    first_line("python3 -c \"import importlib.metadata as m; d = "
               "m.distribution('nvidia-cuda-cuobjdump'); print(next(str(d.locate_file(f)) for f "
               "in d.files if f.name == 'cuobjdump'))\" 2>/dev/null",
               path, sizeof path);
  if (!path[0] || access(path, X_OK) != 0 || strchr(path, '\'')) return false;
  /* cuobjdump -sass runs nvdisasm: the pip packages put both in one bin folder */
  char dir[4096];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (slash) *slash = 0;
  snprintf(cuobjdump, sizeof cuobjdump, "PATH='%s':\"$PATH\" '%s'", slash ? dir : ".", path);
  return true;
}

/* ---- the kernels to check ---------------------------------------------- */

/* A GEMM or attention stage: a template's (an attention span's first stage carries it; the
 * span's other stages run inside that function), whatever the CUDA plan made of it. */
static bool is_contraction(const cm_kstage *s) {
  return s->tmpl != CM_KT_NONE && s->cuda.kind != CM_KCUDA_IN_SPAN;
}

static bool hmma_required(const cm_kstage *s) {
  return s->tmpl != CM_KT_ATTENTION_BWD || HMMA_REQUIRED_BACKWARD;
}

static const char *plan_name(const cm_kstage *s) {
  switch (s->cuda.kind) {
  case CM_KCUDA_GEMM:
    return s->cuda.gemm.mma ? (s->cuda.gemm.bf16 ? "gemm mma bf16" : "gemm mma f16") : "gemm fma";
  case CM_KCUDA_ATTN_FUSED: return "attention fused";
  case CM_KCUDA_ATTN_STREAM: return "attention stream";
  case CM_KCUDA_ATTN_STREAM_BWD: return "attention stream bwd";
  case CM_KCUDA_ATTN_FLASH: return "attention flash";
  case CM_KCUDA_ATTN_FLASH_BWD: return "attention flash bwd";
  case CM_KCUDA_GENERIC: return "generic loop";
  default: return "other plan";
  }
}

/* One distinct kernel: its CUDA C (without the prelude; kernel names are unique within an
 * arch), the same with the name replaced (the key), and per stage the tensor-core
 * instructions cuobjdump found in its function (-1: not found). */
typedef struct unit {
  char *src, *norm;
  const cm_kernel *k;
  int arch, program;
  int *tensor_ops;
} unit;

/* Up to PER_PROGRAM units of one arch in one NVRTC program: fewer compiles and cuobjdump
 * runs (each starts in about 0.3 s of CPU). */
#define PER_PROGRAM 16
typedef struct program {
  int arch, first, count;
  cm_cubin cubin;
  bool ok;
  char error[600];
} program;

static unit *units;
static int n_units;
static program *programs;
static int n_programs, next_program;
static char *prelude;
static pthread_mutex_t program_lock = PTHREAD_MUTEX_INITIALIZER;

static void *compile_worker(void *arg) {
  (void)arg;
  for (;;) {
    pthread_mutex_lock(&program_lock);
    int i = next_program < n_programs ? next_program++ : -1;
    pthread_mutex_unlock(&program_lock);
    if (i < 0) return NULL;
    program *pg = &programs[i];
    size_t len = strlen(prelude) + 1;
    for (int u = pg->first; u < pg->first + pg->count; u++) len += strlen(units[u].src);
    char *src = malloc(len), *o = src;
    if (!src) {
      snprintf(pg->error, sizeof pg->error, "out of memory");
      continue;
    }
    o += sprintf(o, "%s", prelude);
    for (int u = pg->first; u < pg->first + pg->count; u++) o += sprintf(o, "%s", units[u].src);
    cm_err err = {0};
    char fname[64];
    snprintf(fname, sizeof fname, "sass_%s_%d.cu", ARCHS[pg->arch], i);
    pg->ok =
        cm_nvrtc_compile(nvrtc, src, fname, ARCHS[pg->arch], NULL, 0, &pg->cubin, &err) == CM_OK;
    if (!pg->ok) snprintf(pg->error, sizeof pg->error, "%s", err.msg);
    free(src);
  }
}

/* Counts HMMA / HGMMA instructions per stage function of the program's CUBIN (cuobjdump -sass
 * on a temporary copy) into its units; false when cuobjdump failed. */
static bool read_sass(const program *pg, const char *tmpdir) {
  char path[4200], cmd[8600], line[4096];
  snprintf(path, sizeof path, "%s/%s_%d.cubin", tmpdir, ARCHS[pg->arch], pg->first);
  FILE *f = fopen(path, "wb");
  bool written = f && fwrite(pg->cubin.data, 1, pg->cubin.size, f) == pg->cubin.size;
  if (f && fclose(f) != 0) written = false;
  if (!written) return false;
  snprintf(cmd, sizeof cmd, "%s -sass '%s' 2>&1", cuobjdump, path);
  FILE *p = popen(cmd, "r");
  if (!p) return false;
  int *count = NULL, functions = 0; /* the current function's counter (NULL: none) */
  while (fgets(line, sizeof line, p)) {
    const char *fn = strstr(line, "Function : ");
    if (fn) {
      fn += strlen("Function : ");
      functions++;
      count = NULL;
      const char *sep = strstr(fn, "_s"), *next;
      while (sep && (next = strstr(sep + 2, "_s"))) sep = next; /* the last "_s" */
      for (int u = pg->first; u < pg->first + pg->count && sep; u++) {
        const cm_kernel *k = units[u].k;
        int s = atoi(sep + 2);
        if (strlen(k->name) == (size_t)(sep - fn) && !strncmp(fn, k->name, (size_t)(sep - fn)) &&
            s >= 0 && s < k->n_stages)
          count = &units[u].tensor_ops[s], *count = 0;
      }
      continue;
    }
    if (count && (strstr(line, " HMMA.") || strstr(line, " HGMMA."))) ++*count;
  }
  int rc = pclose(p);
  unlink(path);
  return rc == 0 && functions > 0;
}

/* The ViT-B step in bf16 at this batch, through the default pipeline (*plan its plan). */
static cm_graph *bf16_step(int batch, cm_plan **plan) {
  cm_err err = {0};
  *plan = NULL;
  cm_graph *step = test_build_step(MODEL, NULL, 0, batch, NULL, NULL, NULL);
  if (!step) return NULL;
  int rewritten = 0;
  CHECK_MSG(cm_autocast(&step, CM_BF16, &rewritten, &err) == CM_OK, "autocast: %s", err.msg);
  CHECK_MSG(rewritten > 0, "autocast rewrote no contraction of the step");
  cm_pass_state ps = {step, NULL};
  CHECK_MSG(cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK &&
                ps.plan,
            "pipeline: %s", err.msg);
  *plan = ps.plan;
  return ps.g;
}

/* Renders every kernel of prog that holds a contraction stage; unit_of[i] is kernel i's unit
 * (-1: none); the new units are appended to units[]. */
static void collect_units(const cm_kprogram *prog, const cm_target *tgt, int arch, int *unit_of) {
  cm_cuda_render_opts ro = {tgt, false};
  int first = n_units;
  for (int i = 0; i < prog->n_kernels; i++) {
    const cm_kernel *k = &prog->kernels[i];
    unit_of[i] = -1;
    bool any = false;
    for (int s = 0; s < k->n_stages; s++) any |= is_contraction(&k->stages[s]);
    if (!any) continue;
    char *src = NULL;
    cm_err err = {0};
    CHECK_MSG(cm_render_cuda(k, &ro, false, &src, &err) == CM_OK, "%s: %s", k->name, err.msg);
    char *norm = src ? replace_all(src, k->name, "@K@") : NULL;
    for (int u = first; u < n_units && norm && unit_of[i] < 0; u++)
      if (!strcmp(units[u].norm, norm)) unit_of[i] = u;
    if (!norm || unit_of[i] >= 0) {
      free(src), free(norm);
      continue;
    }
    unit *nu = &units[n_units];
    *nu = (unit){.src = src, .norm = norm, .k = k, .arch = arch};
    nu->tensor_ops = malloc(sizeof(int) * (size_t)k->n_stages);
    for (int s = 0; s < k->n_stages; s++) nu->tensor_ops[s] = -1;
    unit_of[i] = n_units++;
  }
  for (int u = first; u < n_units; u += PER_PROGRAM) {
    int count = n_units - u < PER_PROGRAM ? n_units - u : PER_PROGRAM;
    programs[n_programs] = (program){.arch = arch, .first = u, .count = count};
    for (int v = u; v < u + count; v++) units[v].program = n_programs;
    n_programs++;
  }
}

static void compile_programs(void) {
  pthread_t th[N_THREADS];
  pthread_attr_t attr; /* NVRTC's front end recurses deeply on long kernels */
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, (size_t)256 << 20);
  for (int t = 0; t < N_THREADS; t++)
    CHECK(pthread_create(&th[t], &attr, compile_worker, NULL) == 0);
  pthread_attr_destroy(&attr);
  for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);
}

typedef struct tally {
  int stages, mma, fma, generic, attention, with_tensor, spill_bad, stats_bad, tensor_bad,
      tensor_listed, backward, flash_backward;
} tally;

/* One line per contraction stage of kernel k (its code: unit u) with its verdicts, counted
 * into *t; the asserted rules are CHECKs. */
static void judge_kernel(const cm_kernel *k, const unit *u, const cm_target *tgt, const char *arch,
                         tally *t) {
  const program *pg = &programs[u->program];
  cm_cuda_render_opts ro = {tgt, false};
  for (int s = 0; s < k->n_stages; s++) {
    const cm_kstage *st = &k->stages[s];
    if (!is_contraction(st)) continue;
    char fn[128];
    snprintf(fn, sizeof fn, "%s_s%d", u->k->name, s);
    const cm_cuda_kernel_info *ki = pg->ok ? cm_cubin_kernel(&pg->cubin, fn) : NULL;
    cm_cuda_launch l = cm_cuda_stage_launch(k, s, &ro);
    int spill = ki ? ki->spill_store_bytes + ki->spill_load_bytes : -1;
    int tensor = u->tensor_ops[s];
    bool stats_ok = ki && ki->registers > 0, spill_ok = spill == 0, tensor_ok = tensor > 0;
    t->stages++;
    t->mma += st->cuda.kind == CM_KCUDA_GEMM && st->cuda.gemm.mma;
    t->fma += st->cuda.kind == CM_KCUDA_GEMM && !st->cuda.gemm.mma;
    t->attention += st->tmpl != CM_KT_GEMM && st->cuda.kind != CM_KCUDA_GEMM;
    t->generic += st->tmpl == CM_KT_GEMM && st->cuda.kind != CM_KCUDA_GEMM;
    t->with_tensor += tensor_ok;
    t->backward += st->tmpl == CM_KT_ATTENTION_BWD;
    t->flash_backward +=
        st->tmpl == CM_KT_ATTENTION_BWD && st->cuda.kind == CM_KCUDA_ATTN_FLASH_BWD;
    t->stats_bad += !stats_ok;
    t->spill_bad += !spill_ok;
    bool required = hmma_required(st);
    t->tensor_bad += required && !tensor_ok;
    t->tensor_listed += !required && !tensor_ok;
    char shape[160];
    int n = 0;
    for (int d = 0; d < st->n_dom && n < 120; d++)
      n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%lld", d ? "x" : "",
                    (long long)st->dom[d]);
    for (int d = 0; d < st->n_red && n < 150; d++)
      n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%lld", d ? "x" : "|",
                    (long long)st->red[d]);
    fprintf(stderr,
            "  %s %-18s s%-2d %-20s %-22s regs %3d shared %6d spill %4d tensor %4d  %s%s%s%s\n",
            arch, k->name, s, plan_name(st), shape, ki ? ki->registers : -1,
            ki ? ki->shared_bytes + (int)l.shared_bytes : -1, spill, tensor,
            stats_ok && spill_ok && tensor_ok ? "ok" : "", stats_ok ? "" : "NO-STATS ",
            spill_ok ? "" : "SPILLS ", tensor_ok ? "" : "NO-HMMA");
    CHECK_MSG(stats_ok, "%s %s stage %d: no ptxas figures for %s", arch, k->name, s, fn);
    CHECK_MSG(spill_ok, "%s %s stage %d spills %d bytes", arch, k->name, s, spill);
    CHECK_MSG(!required || tensor_ok, "%s %s stage %d (%s): no HMMA/HGMMA in its SASS", arch,
              k->name, s, plan_name(st));
  }
}

/* The whole check at one batch: both arches' contraction kernels compiled together. */
static void check_step(int batch) {
  cm_err err = {0};
  if (!nvrtc && cm_nvrtc_load(&nvrtc, &err) != CM_OK) {
    fprintf(stderr, "skipped: %s\n", err.msg);
    exit(77);
  }
  CHECK_MSG(cuobjdump[0] || find_cuobjdump(),
            "no cuobjdump (CMAEC_CUOBJDUMP, PATH, /usr/local/cuda/bin or the Python package "
            "nvidia-cuda-cuobjdump: run scripts/install-deps.sh)");
  if (!cuobjdump[0]) return;
  double t0 = now_s();
  cm_plan *plan = NULL;
  cm_graph *g = bf16_step(batch, &plan);
  cm_target tgt[N_ARCHS];
  cm_program *pr[N_ARCHS] = {NULL};
  int *unit_of[N_ARCHS] = {NULL}, cap = 0;
  for (int a = 0; a < N_ARCHS && g; a++) {
    cm_compile_opts co = {.compile_only = true, .render_only = true, .plan = plan};
    cm_status st = cm_target_cuda(ARCHS[a], &tgt[a], &err);
    if (st == CM_OK) st = cm_compile(g, &tgt[a], &co, &pr[a], &err);
    CHECK_MSG(st == CM_OK, "lowering for %s: %s", ARCHS[a], err.msg);
    if (st == CM_OK) cap += cm_program_kernels(pr[a])->n_kernels;
  }
  units = calloc((size_t)cap + 1, sizeof *units);
  programs = calloc((size_t)cap + 1, sizeof *programs);
  n_units = n_programs = next_program = 0;
  cm_kernel empty; /* the prelude alone */
  cm_kernel_init(&empty, "none");
  CHECK(cm_render_cuda(&empty, NULL, true, &prelude, &err) == CM_OK);
  cm_kernel_free(&empty);
  for (int a = 0; a < N_ARCHS && pr[a] && prelude; a++) {
    const cm_kprogram *prog = cm_program_kernels(pr[a]);
    unit_of[a] = malloc(sizeof(int) * (size_t)(prog->n_kernels + 1));
    collect_units(prog, &tgt[a], a, unit_of[a]);
  }
  double t_lower = now_s() - t0, t_compile = now_s();
  compile_programs();
  t_compile = now_s() - t_compile;
  double t_sass = now_s();
  char tmpdir[] = "/tmp/cmaec_sass_XXXXXX";
  CHECK(mkdtemp(tmpdir) != NULL);
  for (int i = 0; i < n_programs; i++) {
    CHECK_MSG(programs[i].ok, "%s program %d: NVRTC: %s", ARCHS[programs[i].arch], i,
              programs[i].error);
    if (programs[i].ok)
      CHECK_MSG(read_sass(&programs[i], tmpdir), "%s program %d: cuobjdump -sass failed (%s)",
                ARCHS[programs[i].arch], i, cuobjdump);
  }
  rmdir(tmpdir);
  for (int a = 0; a < N_ARCHS && pr[a]; a++) {
    const cm_kprogram *prog = cm_program_kernels(pr[a]);
    tally t = {0};
    int kernels = 0, distinct = 0;
    for (int i = 0; i < prog->n_kernels; i++) {
      if (unit_of[a][i] < 0) continue;
      kernels++;
      distinct += units[unit_of[a][i]].k == &prog->kernels[i];
      judge_kernel(&prog->kernels[i], &units[unit_of[a][i]], &tgt[a], ARCHS[a], &t);
    }
    fprintf(stderr,
            "%s batch %d %s: %d contraction kernels (%d distinct), %d stages: %d GEMM mma.sync, "
            "%d GEMM FMA, %d GEMM otherwise, %d attention spans; %d with tensor-core instructions; "
            "rules failed: spill %d, stats %d, tensor %d asserted + %d listed\n",
            MODEL, batch, ARCHS[a], kernels, distinct, t.stages, t.mma, t.fma, t.generic,
            t.attention, t.with_tensor, t.spill_bad, t.stats_bad, t.tensor_bad, t.tensor_listed);
    CHECK_MSG(t.stages > 0, "%s: no GEMM or attention stage in the step", ARCHS[a]);
    /* every backward attention span the flash backward (one launch, mma.sync for all five
     * products, no N x N tensor in global memory) */
    fprintf(stderr, "%s: %d of %d backward attention spans flash on tensor cores\n", ARCHS[a],
            t.flash_backward, t.backward);
    CHECK_MSG(t.backward > 0 && t.flash_backward == t.backward,
              "%s: %d of %d backward attention spans flash", ARCHS[a], t.flash_backward,
              t.backward);
  }
  t_sass = now_s() - t_sass;
  fprintf(stderr,
          "built and lowered in %.1f s; %d distinct kernels in %d NVRTC programs compiled on %d "
          "threads in %.1f s; SASS read in %.1f s\n",
          t_lower, n_units, n_programs, N_THREADS, t_compile, t_sass);
  for (int u = 0; u < n_units; u++)
    free(units[u].src), free(units[u].norm), free(units[u].tensor_ops);
  for (int i = 0; i < n_programs; i++) cm_cubin_free(&programs[i].cubin);
  free(units), free(programs), free(prelude);
  units = NULL, programs = NULL, prelude = NULL;
  for (int a = 0; a < N_ARCHS; a++) free(unit_of[a]), cm_program_free(pr[a]);
  cm_plan_free(plan);
  cm_graph_free(g);
}

static void test_vit_base_bf16_batch2(void) {
  check_step(2);
}

/* the realistic batch: other shapes, other tiles (long) */
static void test_vit_base_bf16_batch128(void) {
  check_step(128);
}

TEST_MAIN(TEST(test_vit_base_bf16_batch2), TEST(test_vit_base_bf16_batch128))
