/* tests/unit/test_cuda_build.c — cm_cuda_build_program: the on-disk module cache (hits on a
 * second build, byte-identical images, ptxas figures from a hit, damaged files are misses and
 * are replaced, two processes sharing one empty cache) and the parallel compile (1 and 2
 * threads give the same images; a compile error names its kernel, the first in module order).
 * The fake compiler's tests (its image: the source's bytes) need no NVRTC; the rest skip with
 * exit 77 only when NVRTC cannot be loaded. */
#define _GNU_SOURCE /* nftw, memmem */
#include "codegen/codegen.h"
#include "models/models.h"
#include "runtime/runtime.h"
#include "tests/test.h"

#include <fcntl.h>
#include <ftw.h>
#include <pthread.h>
#include <stdatomic.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- a small program: tanh(x W1) and tanh(z W2) (one module), softmax(x) ---- */

typedef struct small_program {
  cm_graph *g;
  cm_plan *plan;
  cm_target target;
  cm_kprogram kp;
} small_program;

static bool small_program_make(small_program *sp) {
  memset(sp, 0, sizeof *sp);
  cm_err err = {0};
  sp->g = cm_graph_new();
  int64_t xd[2] = {8, 32}, wd[2] = {32, 32};
  int x = cm_input(sp->g, "x", CM_F32, 2, xd);
  int w1 = cm_input(sp->g, "w1", CM_F32, 2, wd), w2 = cm_input(sp->g, "w2", CM_F32, 2, wd);
  int z = cm_input(sp->g, "z", CM_F32, 2, xd);
  int a1 = cm_unary(sp->g, CM_OP_TANH, cm_matmul(sp->g, x, w1, false, false, "h1"), "a1");
  int a2 = cm_unary(sp->g, CM_OP_TANH, cm_matmul(sp->g, z, w2, false, false, "h2"), "a2");
  CHECK(cm_graph_add_output(sp->g, a1, &err) == CM_OK);
  CHECK(cm_graph_add_output(sp->g, a2, &err) == CM_OK);
  CHECK(cm_graph_add_output(sp->g, cm_nn_softmax(sp->g, x), &err) == CM_OK);
  cm_pass_state ps = {sp->g, NULL};
  bool ok = cm_pipeline_run(&ps, cm_default_pipeline, NULL, NULL, 0, NULL, &err) == CM_OK;
  sp->g = ps.g;
  sp->plan = ps.plan;
  ok = ok && cm_target_cuda("sm_80", &sp->target, &err) == CM_OK;
  cm_lower_opts lo = {&sp->target, false, 0};
  ok = ok && cm_lower_plan(sp->g, sp->plan, &lo, &sp->kp, &err) == CM_OK;
  CHECK_MSG(ok, "%s", err.msg);
  return ok;
}

static void small_program_free(small_program *sp) {
  cm_kprogram_free(&sp->kp);
  cm_plan_free(sp->plan);
  cm_graph_free(sp->g);
}

/* ---- temporary caches ---- */

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
  (void)st, (void)flag, (void)ftw;
  return remove(path);
}

static void temp_dir(char *buf, size_t size) {
  snprintf(buf, size, "/tmp/cmaec_test_cuda_build_XXXXXX");
  CHECK(mkdtemp(buf) != NULL);
}

static void remove_tree(const char *dir) {
  nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static void module_path(const char *root, const cm_cuda_compiler *c, const cm_cuda_module *mod,
                        char *buf, size_t size) {
  snprintf(buf, size, "%s/cuda/%s.%s", root, mod->key, c->image_suffix);
}

/* Files under root/cuda whose name starts with prefix. */
static int count_files(const char *root, const char *prefix) {
  char cmd[600];
  snprintf(cmd, sizeof cmd, "ls -A %s/cuda | grep -c '^%s'", root, prefix);
  FILE *p = popen(cmd, "r");
  int n = -1;
  if (p && fscanf(p, "%d", &n) != 1) n = -1;
  if (p) pclose(p);
  return n;
}

static bool same_images(const cm_cuda_build *a, const cm_cuda_build *b) {
  if (a->n_modules != b->n_modules) return false;
  for (int m = 0; m < a->n_modules; m++) {
    const cm_cubin *x = &a->modules[m].image, *y = &b->modules[m].image;
    if (x->size != y->size || memcmp(x->data, y->data, x->size) != 0) return false;
    if (strcmp(a->modules[m].key, b->modules[m].key) != 0) return false;
  }
  return true;
}

static cm_status build(const small_program *sp, const cm_cuda_compiler *c, const char *cache,
                       int threads, cm_cuda_build *out, cm_err *err) {
  return cm_cuda_build_program(&sp->kp, &sp->target, false, c, cache, threads, out, err);
}

/* ---- the fake compiler: the image is the source's bytes ---- */

static atomic_int fake_compiles;
static pthread_mutex_t fake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_t fake_threads[8]; /* the distinct threads that compiled (under fake_lock) */
static int fake_n_threads;

static cm_status fake_compile(void *self, const char *source, const char *name, const char *arch,
                              cm_cubin *out, cm_err *err) {
  (void)self, (void)name, (void)arch, (void)err;
  memset(out, 0, sizeof *out);
  atomic_fetch_add(&fake_compiles, 1);
  pthread_mutex_lock(&fake_lock);
  bool seen = false;
  for (int i = 0; i < fake_n_threads; i++) seen |= pthread_equal(fake_threads[i], pthread_self());
  if (!seen && fake_n_threads < 8) fake_threads[fake_n_threads++] = pthread_self();
  pthread_mutex_unlock(&fake_lock);
  usleep(20000); /* long enough for the other thread to take the next module */
  out->size = strlen(source);
  out->data = malloc(out->size);
  out->log = calloc(1, 1);
  out->kernels = calloc(1, sizeof *out->kernels); /* what a compiler without ptxas reports */
  if (!out->data || !out->log || !out->kernels)
    return cm_errorf(err, CM_EINTERNAL, "out of memory");
  out->n_kernels = 1;
  snprintf(out->kernels[0].name, sizeof out->kernels[0].name, "%s", name);
  out->kernels[0].registers = (int)(out->size % 97) + 1;
  memcpy(out->data, source, out->size);
  return CM_OK;
}

static const cm_cuda_compiler fake_compiler = {"fake 1", "img", fake_compile, NULL};

static void test_fake_cache_and_threads(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  char root[64];
  temp_dir(root, sizeof root);
  cm_err err = {0};
  cm_cuda_build cold, warm, one;
  atomic_store(&fake_compiles, 0);
  fake_n_threads = 0;
  CHECK_MSG(build(&sp, &fake_compiler, root, 2, &cold, &err) == CM_OK, "%s", err.msg);
  /* the two layers share a module; every module compiled once, on both threads */
  CHECK(cold.n_modules >= 2 && cold.n_modules < sp.kp.n_kernels);
  CHECK(cold.threads == 2 && fake_n_threads == 2);
  CHECK(cold.cache_misses == cold.n_modules && cold.cache_hits == 0);
  CHECK(atomic_load(&fake_compiles) == cold.n_modules);
  CHECK(cold.cache_write_failures == 0 && cold.cache_rejected == 0);
  CHECK(count_files(root, "[0-9a-f]") == cold.n_modules && count_files(root, ".tmp") == 0);
  for (int m = 0; m < cold.n_modules; m++) {
    char *src = NULL;
    const cm_cuda_module *mod = &cold.modules[m];
    CHECK(cm_cuda_module_source(&sp.kp.kernels[mod->kernel], &sp.target, false, &src, &err) ==
          CM_OK);
    CHECK(src && mod->image.size == strlen(src) && !memcmp(mod->image.data, src, strlen(src)));
    CHECK(strlen(mod->key) == 32 && !mod->cached);
    free(src);
  }
  /* temporary files: one a dead process left two hours ago goes, a fresh one stays */
  char old_tmp[200], new_tmp[200];
  snprintf(old_tmp, sizeof old_tmp, "%s/cuda/.tmp-1-0-0", root);
  snprintf(new_tmp, sizeof new_tmp, "%s/cuda/.tmp-1-0-1", root);
  FILE *f1 = fopen(old_tmp, "w"), *f2 = fopen(new_tmp, "w");
  CHECK(f1 && f2);
  if (f1) fclose(f1);
  if (f2) fclose(f2);
  struct timespec two_hours_ago[2] = {{time(NULL) - 7200, 0}, {time(NULL) - 7200, 0}};
  CHECK(utimensat(AT_FDCWD, old_tmp, two_hours_ago, 0) == 0);
  CHECK_MSG(build(&sp, &fake_compiler, root, 0, &warm, &err) == CM_OK, "%s", err.msg);
  CHECK(access(old_tmp, F_OK) != 0 && access(new_tmp, F_OK) == 0);
  unlink(new_tmp);
  CHECK(warm.cache_hits == warm.n_modules && warm.cache_misses == 0);
  CHECK(atomic_load(&fake_compiles) == cold.n_modules); /* nothing compiled */
  CHECK(same_images(&cold, &warm) && warm.modules[0].cached);
  for (int m = 0; m < cold.n_modules; m++) /* the compiler's kernel infos come back from a hit */
    CHECK(warm.modules[m].image.n_kernels == 1 &&
          !memcmp(warm.modules[m].image.kernels, cold.modules[m].image.kernels,
                  sizeof *cold.modules[m].image.kernels));
  CHECK_MSG(build(&sp, &fake_compiler, "", 1, &one, &err) == CM_OK, "%s", err.msg);
  CHECK(one.threads == 1 && one.cache_misses == one.n_modules && same_images(&cold, &one));
  cm_cuda_build_free(&cold), cm_cuda_build_free(&warm), cm_cuda_build_free(&one);
  remove_tree(root);
  small_program_free(&sp);
}

/* ---- kernels split into parts ---- */

/* Builds sp with every kernel split into one module per stage ($CMAEC_CUDA_PART_BYTES=1). */
static cm_status build_split(const small_program *sp, const cm_cuda_compiler *c, int threads,
                             cm_cuda_build *out, cm_err *err) {
  setenv("CMAEC_CUDA_PART_BYTES", "1", 1);
  cm_status st = build(sp, c, NULL, threads, out, err);
  unsetenv("CMAEC_CUDA_PART_BYTES");
  return st;
}

/* Every stage's function is in the module cm_cuda_stage_module names, and only there. */
static void check_stage_modules(const small_program *sp, const cm_cuda_build *b) {
  for (int i = 0; i < sp->kp.n_kernels; i++)
    for (int s = 0; s < sp->kp.kernels[i].n_stages; s++) {
      int m = cm_cuda_stage_module(b, i, s);
      const cm_cuda_module *mod = &b->modules[m];
      char fn[64];
      snprintf(fn, sizeof fn, " %s_s%d(", CM_CUDA_MODULE_KERNEL, s);
      int holders = 0;
      for (int q = b->module_of[i]; q < b->n_modules && b->modules[q].kernel == mod->kernel; q++)
        holders +=
            memmem(b->modules[q].image.data, b->modules[q].image.size, fn, strlen(fn)) != NULL;
      CHECK_MSG(m >= b->module_of[i] && s >= mod->stage_begin && s < mod->stage_end &&
                    memmem(mod->image.data, mod->image.size, fn, strlen(fn)) && holders == 1,
                "kernel %d stage %d: module %d holds [%d, %d), %d holders", i, s, m,
                mod->stage_begin, mod->stage_end, holders);
    }
}

static void test_fake_split(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  cm_err err = {0};
  cm_cuda_build whole, split;
  CHECK_MSG(build(&sp, &fake_compiler, NULL, 2, &whole, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(build_split(&sp, &fake_compiler, 2, &split, &err) == CM_OK, "%s", err.msg);
  int stages = 0;
  for (int m = 0; m < whole.n_modules; m++) {
    CHECK(whole.modules[m].stage_begin == 0);
    stages += sp.kp.kernels[whole.modules[m].kernel].n_stages;
  }
  CHECK_MSG(split.n_modules == stages && stages > whole.n_modules, "%d modules, %d stages",
            split.n_modules, stages);
  CHECK(whole.n_distinct == whole.n_modules && split.n_distinct == whole.n_distinct);
  check_stage_modules(&sp, &whole);
  check_stage_modules(&sp, &split);
  cm_cuda_build_free(&whole), cm_cuda_build_free(&split);
  small_program_free(&sp);
}

/* ---- damaged cache files ---- */

typedef enum damage { TRUNCATED, FLIPPED_BYTE, OTHER_SOURCE, NOT_A_CACHE_FILE } damage;

static void damage_file(const char *path, const char *other, damage how) {
  FILE *f = fopen(path, "rb");
  CHECK(f != NULL);
  if (!f) return;
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *bytes = malloc((size_t)size);
  CHECK(bytes && fread(bytes, 1, (size_t)size, f) == (size_t)size);
  fclose(f);
  if (how == OTHER_SOURCE) { /* another module's whole, valid file under this name */
    CHECK(rename(other, path) == 0);
    free(bytes);
    return;
  }
  if (how == FLIPPED_BYTE) bytes[size * 2 / 3] ^= 0x20;
  if (how == NOT_A_CACHE_FILE) memcpy(bytes, "\177ELF", 4);
  f = fopen(path, "wb");
  CHECK(f != NULL);
  size_t n = how == TRUNCATED ? (size_t)size / 2 : (size_t)size;
  if (f) CHECK(fwrite(bytes, 1, n, f) == n && fclose(f) == 0);
  free(bytes);
}

static void check_damaged_files(const cm_cuda_compiler *c) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  char root[64];
  temp_dir(root, sizeof root);
  cm_err err = {0};
  cm_cuda_build first;
  CHECK_MSG(build(&sp, c, root, 2, &first, &err) == CM_OK, "%s", err.msg);
  CHECK(first.n_modules >= 2);
  static const char *const names[] = {"truncated", "flipped byte", "other source", "not ours"};
  for (damage how = TRUNCATED; how <= NOT_A_CACHE_FILE && first.n_modules >= 2; how++) {
    char path[600], other[600];
    module_path(root, c, &first.modules[0], path, sizeof path);
    module_path(root, c, &first.modules[1], other, sizeof other);
    damage_file(path, other, how);
    int missing = how == OTHER_SOURCE; /* module 1's file moved away */
    cm_cuda_build again, after;
    CHECK_MSG(build(&sp, c, root, 2, &again, &err) == CM_OK, "%s: %s", names[how], err.msg);
    CHECK_MSG(again.cache_rejected == 1 && again.cache_misses == 1 + missing &&
                  again.cache_hits == first.n_modules - 1 - missing && !again.modules[0].cached,
              "%s: %d rejected, %d misses", names[how], again.cache_rejected, again.cache_misses);
    CHECK_MSG(same_images(&first, &again), "%s", names[how]);
    /* the damaged file was replaced */
    CHECK_MSG(build(&sp, c, root, 1, &after, &err) == CM_OK, "%s", err.msg);
    CHECK_MSG(after.cache_misses == 0 && after.cache_rejected == 0 && same_images(&first, &after),
              "%s: %d misses after the rewrite", names[how], after.cache_misses);
    cm_cuda_build_free(&again), cm_cuda_build_free(&after);
  }
  CHECK(count_files(root, ".tmp") == 0);
  cm_cuda_build_free(&first);
  remove_tree(root);
  small_program_free(&sp);
}

static void test_fake_damaged_files(void) {
  check_damaged_files(&fake_compiler);
}

/* ---- NVRTC ---- */

static const cm_cuda_compiler *nvrtc;

static void test_nvrtc_cache(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  char root[64];
  temp_dir(root, sizeof root);
  cm_err err = {0};
  cm_cuda_build cold, warm;
  CHECK_MSG(build(&sp, nvrtc, root, 2, &cold, &err) == CM_OK, "%s", err.msg);
  CHECK(cold.cache_misses == cold.n_modules && cold.cache_write_failures == 0);
  CHECK_MSG(build(&sp, nvrtc, root, 2, &warm, &err) == CM_OK, "%s", err.msg);
  CHECK(warm.cache_misses == 0 && warm.cache_hits == warm.n_modules);
  CHECK(same_images(&cold, &warm));
  for (int m = 0; m < cold.n_modules && m < warm.n_modules; m++) {
    const cm_cubin *a = &cold.modules[m].image, *b = &warm.modules[m].image;
    CHECK(a->size > 4 && !memcmp(a->data, "\177ELF", 4)); /* a CUBIN, not PTX */
    CHECK(strcmp(a->log, b->log) == 0 && a->n_kernels == b->n_kernels && a->n_kernels >= 1);
    const cm_cuda_kernel_info *ka = cm_cubin_kernel(a, "cmk_s0");
    const cm_cuda_kernel_info *kb = cm_cubin_kernel(b, "cmk_s0");
    CHECK(ka && kb && ka->registers > 0 && ka->registers == kb->registers);
    CHECK(ka && kb && ka->shared_bytes == kb->shared_bytes && ka->stack_bytes == kb->stack_bytes);
  }
  cm_cuda_build_free(&cold), cm_cuda_build_free(&warm);
  remove_tree(root);
  small_program_free(&sp);
}

static void test_nvrtc_damaged_files(void) {
  check_damaged_files(nvrtc);
}

/* Split modules define the same functions with the same resources. */
static void test_nvrtc_split(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  cm_err err = {0};
  cm_cuda_build whole, split;
  CHECK_MSG(build(&sp, nvrtc, NULL, 2, &whole, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(build_split(&sp, nvrtc, 2, &split, &err) == CM_OK, "%s", err.msg);
  CHECK(split.n_modules > whole.n_modules);
  for (int i = 0; i < sp.kp.n_kernels; i++)
    for (int s = 0; s < sp.kp.kernels[i].n_stages; s++) {
      char fn[64];
      snprintf(fn, sizeof fn, "%s_s%d", CM_CUDA_MODULE_KERNEL, s);
      const cm_cubin *a = &whole.modules[cm_cuda_stage_module(&whole, i, s)].image;
      const cm_cubin *b = &split.modules[cm_cuda_stage_module(&split, i, s)].image;
      const cm_cuda_kernel_info *ka = cm_cubin_kernel(a, fn), *kb = cm_cubin_kernel(b, fn);
      CHECK_MSG(ka && kb && b->n_kernels == 1 && ka->registers == kb->registers &&
                    ka->shared_bytes == kb->shared_bytes,
                "kernel %d %s: %d functions in its part", i, fn, b->n_kernels);
    }
  cm_cuda_build_free(&whole), cm_cuda_build_free(&split);
  small_program_free(&sp);
}

static void test_nvrtc_threads(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  cm_err err = {0};
  cm_cuda_build one, two;
  CHECK_MSG(build(&sp, nvrtc, NULL, 1, &one, &err) == CM_OK, "%s", err.msg);
  CHECK_MSG(build(&sp, nvrtc, NULL, 2, &two, &err) == CM_OK, "%s", err.msg);
  CHECK(one.threads == 1 && two.threads == 2 && same_images(&one, &two));
  CHECK(one.cache_hits == 0 && two.cache_hits == 0 && two.cache_misses == two.n_modules);
  cm_cuda_build_free(&one), cm_cuda_build_free(&two);
  small_program_free(&sp);
}

/* Two processes build into one empty cache at once; both succeed, and the cache then holds
 * every module, whole. */
static void test_nvrtc_two_processes(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  char root[64];
  temp_dir(root, sizeof root);
  cm_err err = {0};
  cm_cuda_build ref, shared;
  CHECK_MSG(build(&sp, nvrtc, NULL, 1, &ref, &err) == CM_OK, "%s", err.msg);
  pid_t pid[2];
  for (int i = 0; i < 2; i++) {
    pid[i] = fork();
    if (pid[i] == 0) {
      cm_cuda_build b;
      bool ok = build(&sp, nvrtc, root, 2, &b, &err) == CM_OK && same_images(&ref, &b);
      _exit(ok ? 0 : 1);
    }
    CHECK(pid[i] > 0);
  }
  for (int i = 0; i < 2; i++) {
    int status = -1;
    CHECK(pid[i] > 0 && waitpid(pid[i], &status, 0) == pid[i]);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "process %d: status %d", i, status);
  }
  CHECK_MSG(build(&sp, nvrtc, root, 2, &shared, &err) == CM_OK, "%s", err.msg);
  CHECK(shared.cache_misses == 0 && shared.cache_rejected == 0 && same_images(&ref, &shared));
  CHECK(count_files(root, ".tmp") == 0 && count_files(root, "[0-9a-f]") == ref.n_modules);
  cm_cuda_build_free(&ref), cm_cuda_build_free(&shared);
  remove_tree(root);
  small_program_free(&sp);
}

/* NVRTC with "#error" put into the modules of two kernels. */
static const char *broken_kernels[2];

static cm_status broken_compile(void *self, const char *source, const char *name, const char *arch,
                                cm_cubin *out, cm_err *err) {
  bool broken = false;
  for (int i = 0; i < 2; i++) {
    size_t n = strlen(broken_kernels[i]);
    broken |= !strncmp(name, broken_kernels[i], n) && !strcmp(name + n, ".cu");
  }
  if (!broken) return nvrtc->compile(nvrtc->self, source, name, arch, out, err);
  size_t n = strlen(source);
  char *bad = malloc(n + 64);
  if (!bad) return cm_errorf(err, CM_EINTERNAL, "out of memory");
  snprintf(bad, n + 64, "%s\n#error injected failure\n", source);
  cm_status st = nvrtc->compile(nvrtc->self, bad, name, arch, out, err);
  free(bad);
  return st;
}

static void test_nvrtc_compile_error(void) {
  small_program sp;
  if (!small_program_make(&sp)) return;
  cm_err err = {0};
  cm_cuda_build b, probe;
  CHECK_MSG(build(&sp, &fake_compiler, NULL, 1, &probe, &err) == CM_OK, "%s", err.msg);
  int last = probe.n_modules - 1;
  if (last >= 1) { /* break the last two modules: the error must name the earlier one */
    broken_kernels[0] = sp.kp.kernels[probe.modules[last].kernel].name;
    broken_kernels[1] = sp.kp.kernels[probe.modules[last - 1].kernel].name;
  }
  cm_cuda_build_free(&probe);
  CHECK(last >= 1);
  if (last < 1) return small_program_free(&sp);
  cm_cuda_compiler broken = {"nvrtc broken", "cubin", broken_compile, NULL};
  for (int threads = 1; threads <= 2; threads++) {
    memset(&b, 0xab, sizeof b);
    CHECK(build(&sp, &broken, NULL, threads, &b, &err) == CM_EINVALID);
    char want[200];
    snprintf(want, sizeof want, "kernel %s (nvrtc broken): ", broken_kernels[1]);
    CHECK_STR_CONTAINS(err.msg, want);
    CHECK_STR_CONTAINS(err.msg, "injected failure");
    CHECK(b.n_modules == 0 && b.modules == NULL); /* nothing left to free */
  }
  small_program_free(&sp);
}

int main(int argc, char **argv) {
  if (argc > 1) {
    fprintf(stderr, "%s: takes no arguments\n", argv[0]);
    return 2;
  }
  test_case fake[] = {TEST(test_fake_cache_and_threads), TEST(test_fake_split),
                      TEST(test_fake_damaged_files)};
  test_case real[] = {TEST(test_nvrtc_cache),         TEST(test_nvrtc_damaged_files),
                      TEST(test_nvrtc_split),         TEST(test_nvrtc_threads),
                      TEST(test_nvrtc_two_processes), TEST(test_nvrtc_compile_error)};
  for (size_t i = 0; i < sizeof fake / sizeof fake[0]; i++) {
    int before = test_failures;
    fake[i].fn();
    fprintf(stderr, "%-40s %s\n", fake[i].name, test_failures == before ? "ok" : "FAILED");
  }
  cm_err err = {0};
  if (cm_cuda_compiler_nvrtc(&nvrtc, &err) != CM_OK) {
    fprintf(stderr, "%d checks, %d failures; NVRTC tests skipped: %s\n", test_checks, test_failures,
            err.msg);
    return test_failures ? 1 : 77;
  }
  for (size_t i = 0; i < sizeof real / sizeof real[0]; i++) {
    int before = test_failures;
    real[i].fn();
    fprintf(stderr, "%-40s %s\n", real[i].name, test_failures == before ? "ok" : "FAILED");
  }
  fprintf(stderr, "%d checks, %d failures\n", test_checks, test_failures);
  return test_failures ? 1 : 0;
}
