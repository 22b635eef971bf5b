/* tests/unit/test_checkpoint.c — checkpoints: bitwise round trip with
 * metadata, torn/corrupt files rejected naming the file, leftover temp files
 * ignored, pruning, and a writer SIGKILLed mid-write leaving the last good
 * checkpoint loadable. */
#include "../../runtime/training.h"
#include "../test.h"
#include "../testlib.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static test_rng rng_state;
static uint64_t next_u64(void) {
  return test_u64(&rng_state);
}

static void fill_random(cm_tensor *t) {
  size_t nb = cm_type_nbytes(&t->type);
  uint8_t *p = t->data;
  for (size_t i = 0; i < nb; i++) p[i] = (uint8_t)next_u64();
  if (t->type.dtype == CM_BOOL)
    for (size_t i = 0; i < nb; i++) p[i] &= 1;
}

static void make_dir(char *tmpl) {
  CHECK(mkdtemp(tmpl) != NULL);
}

static void remove_dir(const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  struct dirent *e;
  char p[512];
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.' && (!e->d_name[1] || (e->d_name[1] == '.' && !e->d_name[2]))) continue;
    snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
    unlink(p);
  }
  closedir(d);
  rmdir(dir);
}

static bool file_exists(const char *p) {
  struct stat sb;
  return stat(p, &sb) == 0;
}

enum { NT = 6 };
static const char *names[NT] = {"encoder.blocks.0.attn.qkv.weight",
                                "optimizer.exp_avg.pos",
                                "optimizer.exp_avg_sq.pos",
                                "target.cls_token",
                                "step_i64",
                                "mask_bool"};

static void make_tensors(cm_tensor *ts) {
  cm_err err = {0};
  int64_t d0[] = {7, 13}, d1[] = {1, 197, 3}, d3[] = {1}, d5[] = {5, 1, 3};
  CHECK(cm_tensor_alloc(&ts[0], cm_type_make(CM_F32, 2, d0), &err) == CM_OK);
  CHECK(cm_tensor_alloc(&ts[1], cm_type_make(CM_BF16, 3, d1), &err) == CM_OK);
  CHECK(cm_tensor_alloc(&ts[2], cm_type_make(CM_F64, 3, d1), &err) == CM_OK);
  CHECK(cm_tensor_alloc(&ts[3], cm_type_make(CM_F16, 1, d3), &err) == CM_OK);
  CHECK(cm_tensor_alloc(&ts[4], cm_type_make(CM_I64, 0, NULL), &err) == CM_OK);
  CHECK(cm_tensor_alloc(&ts[5], cm_type_make(CM_BOOL, 3, d5), &err) == CM_OK);
  for (int i = 0; i < NT; i++) fill_random(&ts[i]);
  ((uint32_t *)ts[0].data)[3] = 0x7fc01234u; /* a NaN payload survives */
}

static void test_roundtrip(void) {
  rng_state.s = 11;
  char dir[] = "/tmp/cmaec_ckpt_XXXXXX";
  make_dir(dir);
  cm_tensor ts[NT];
  make_tensors(ts);
  const cm_tensor *tp[NT];
  for (int i = 0; i < NT; i++) tp[i] = &ts[i];
  cm_model_config cfg;
  cm_model_config_default(&cfg);
  char *cj = cm_model_config_to_json(&cfg);
  cm_checkpoint_meta m = {.step = 1234567,
                          .epoch = 42,
                          .rng_seed = 0xfedcba9876543210ull,
                          .n_rng_counters = 3,
                          .rng_counters = {0, 18446744073709551615ull, 77},
                          .config_json = cj};
  cm_err err = {0};
  char *path = NULL;
  CHECK(cm_checkpoint_save(dir, &m, NT, names, tp, 0, &path, &err) == CM_OK);
  CHECK(path && strstr(path, "/ckpt-1234567.safetensors"));
  char *lp = NULL;
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_OK);
  CHECK(lp && path && strcmp(lp, path) == 0);
  cm_tensor_set set;
  cm_checkpoint_meta got;
  CHECK_MSG(cm_checkpoint_load(lp, &set, &got, &err) == CM_OK, "%s", err.msg);
  CHECK(set.n == NT);
  for (int i = 0; i < NT && set.n == NT; i++) {
    const cm_tensor *t = cm_tensor_set_get(&set, names[i]);
    CHECK_MSG(t != NULL, "%s", names[i]);
    if (!t) continue;
    CHECK(cm_type_equal(&t->type, &ts[i].type));
    CHECK_MSG(memcmp(t->data, ts[i].data, cm_type_nbytes(&ts[i].type)) == 0, "%s", names[i]);
  }
  CHECK(got.step == 1234567 && got.epoch == 42 && got.rng_seed == 0xfedcba9876543210ull);
  CHECK(got.n_rng_counters == 3 && got.rng_counters[0] == 0 &&
        got.rng_counters[1] == 18446744073709551615ull && got.rng_counters[2] == 77);
  CHECK(got.config_json && strcmp(got.config_json, cj) == 0);
  /* it is a plain safetensors file too */
  cm_tensor_set plain;
  CHECK(cm_safetensors_load(lp, &plain, &err) == CM_OK);
  CHECK(plain.n == NT);
  cm_tensor_set_free(&plain);
  cm_tensor_set_free(&set);
  cm_checkpoint_meta_free(&got);

  /* no config, no counters, no tensors */
  cm_checkpoint_meta m2 = {.step = 0, .epoch = 0, .rng_seed = 5};
  char p2[512];
  snprintf(p2, sizeof p2, "%s/empty.safetensors", dir);
  CHECK(cm_checkpoint_write(p2, &m2, 0, NULL, NULL, &err) == CM_OK);
  CHECK(cm_checkpoint_load(p2, &set, &got, &err) == CM_OK);
  CHECK(set.n == 0 && got.rng_seed == 5 && got.n_rng_counters == 0 && !got.config_json);
  cm_tensor_set_free(&set);
  cm_checkpoint_meta_free(&got);

  /* bad input */
  const char *dup[2] = {"a", "a"};
  const cm_tensor *tp2[2] = {&ts[0], &ts[1]};
  CHECK(cm_checkpoint_write(p2, &m2, 2, dup, tp2, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "duplicate");
  const char *res[1] = {"__metadata__"};
  CHECK(cm_checkpoint_write(p2, &m2, 1, res, tp2, &err) == CM_EINVALID);
  /* a plain safetensors file is not a checkpoint */
  cm_tensor_set s3;
  cm_tensor_set_init(&s3);
  CHECK(cm_tensor_set_add(&s3, "x", &ts[0], &err) == CM_OK);
  CHECK(cm_safetensors_save(p2, &s3, &err) == CM_OK);
  cm_tensor_set_free(&s3);
  CHECK(cm_checkpoint_load(p2, &set, &got, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, p2);

  free(lp);
  free(path);
  free(cj);
  for (int i = 0; i < NT; i++) cm_tensor_free(&ts[i]);
  remove_dir(dir);
}

static void test_torn_and_corrupt(void) {
  rng_state.s = 12;
  char dir[] = "/tmp/cmaec_ckpt_XXXXXX";
  make_dir(dir);
  cm_tensor ts[NT];
  make_tensors(ts);
  const cm_tensor *tp[NT];
  for (int i = 0; i < NT; i++) tp[i] = &ts[i];
  cm_checkpoint_meta m = {.step = 3,
                          .epoch = 1,
                          .rng_seed = 9,
                          .n_rng_counters = 1,
                          .rng_counters = {4},
                          .config_json = "{\"a\":1}"};
  cm_err err = {0};
  char *path;
  CHECK(cm_checkpoint_save(dir, &m, NT, names, tp, 0, &path, &err) == CM_OK);
  char *data;
  size_t len;
  CHECK(cm_read_file(path, &data, &len, &err) == CM_OK);
  char bad[512];
  snprintf(bad, sizeof bad, "%s/bad.safetensors", dir);
  cm_tensor_set set;
  cm_checkpoint_meta got;
  /* truncations: inside the length field, the header, the data, one byte short */
  size_t cuts[] = {0, 5, 8, 40, len / 2, len - 17, len - 1};
  for (int i = 0; i < 7; i++) {
    FILE *f = fopen(bad, "wb");
    fwrite(data, 1, cuts[i], f);
    fclose(f);
    cm_status st = cm_checkpoint_load(bad, &set, &got, &err);
    CHECK_MSG(st == CM_EINVALID, "cut at %zu", cuts[i]);
    CHECK_STR_CONTAINS(err.msg, bad);
    CHECK(set.n == 0 && got.config_json == NULL);
  }
  /* one flipped bit in the data: the CRC catches it */
  for (int i = 0; i < 5; i++) {
    size_t at = len - 1 - (size_t)(next_u64() % 500);
    data[at] ^= (char)(1 << (i % 8));
    FILE *f = fopen(bad, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
    data[at] ^= (char)(1 << (i % 8));
    CHECK(cm_checkpoint_load(bad, &set, &got, &err) == CM_EINVALID);
    CHECK_STR_CONTAINS(err.msg, "CRC");
    CHECK_STR_CONTAINS(err.msg, bad);
  }
  /* the unmodified bytes load */
  FILE *f = fopen(bad, "wb");
  fwrite(data, 1, len, f);
  fclose(f);
  CHECK(cm_checkpoint_load(bad, &set, &got, &err) == CM_OK);
  cm_tensor_set_free(&set);
  cm_checkpoint_meta_free(&got);
  free(data);
  free(path);
  snprintf(bad, sizeof bad, "%s/missing.safetensors", dir);
  CHECK(cm_checkpoint_load(bad, &set, &got, &err) != CM_OK);
  for (int i = 0; i < NT; i++) cm_tensor_free(&ts[i]);
  remove_dir(dir);
}

static void test_leftover_tmp_latest_and_keep(void) {
  rng_state.s = 13;
  char dir[] = "/tmp/cmaec_ckpt_XXXXXX";
  make_dir(dir);
  cm_tensor ts[NT];
  make_tensors(ts);
  const cm_tensor *tp[NT];
  for (int i = 0; i < NT; i++) tp[i] = &ts[i];
  cm_err err = {0};
  char *lp = NULL, p[512];
  /* nothing yet */
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_EINVALID);
  cm_checkpoint_meta m = {.step = 10, .epoch = 1, .rng_seed = 1};
  CHECK(cm_checkpoint_save(dir, &m, NT, names, tp, 2, NULL, &err) == CM_OK);
  /* a crashed writer's leftover of the next checkpoint */
  snprintf(p, sizeof p, "%s/ckpt-20.safetensors.tmp", dir);
  FILE *f = fopen(p, "wb");
  fputs("\x10\x00\x00\x00\x00\x00\x00\x00{\"garbage", f);
  fclose(f);
  cm_tensor_set set;
  cm_checkpoint_meta got;
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_OK);
  CHECK(lp && strstr(lp, "ckpt-10.safetensors"));
  CHECK(cm_checkpoint_load(lp, &set, &got, &err) == CM_OK && got.step == 10);
  cm_tensor_set_free(&set);
  free(lp);
  /* saving that step replaces the leftover */
  m.step = 20;
  CHECK(cm_checkpoint_save(dir, &m, NT, names, tp, 2, NULL, &err) == CM_OK);
  CHECK(!file_exists(p));
  snprintf(p, sizeof p, "%s/ckpt-25.safetensors.tmp", dir); /* another leftover */
  f = fopen(p, "wb");
  fputs("x", f);
  fclose(f);
  m.step = 30;
  CHECK(cm_checkpoint_save(dir, &m, NT, names, tp, 2, NULL, &err) == CM_OK);
  CHECK(!file_exists(p)); /* pruned with the old checkpoints */
  snprintf(p, sizeof p, "%s/ckpt-10.safetensors", dir);
  CHECK(!file_exists(p)); /* keep = 2 */
  snprintf(p, sizeof p, "%s/ckpt-20.safetensors", dir);
  CHECK(file_exists(p));
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_OK && strstr(lp, "ckpt-30."));
  free(lp);
  /* no pointer: the highest step present */
  snprintf(p, sizeof p, "%s/latest", dir);
  unlink(p);
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_OK && strstr(lp, "ckpt-30."));
  free(lp);
  /* a pointer leading outside the directory is refused */
  f = fopen(p, "wb");
  fputs("../etc/passwd\n", f);
  fclose(f);
  CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_EINVALID);
  for (int i = 0; i < NT; i++) cm_tensor_free(&ts[i]);
  remove_dir(dir);
}

/* Checkpoint contents of step s: big enough that writing takes a while. */
enum { BIG = 4 << 20 }; /* floats per tensor; 2 tensors: 32 MiB */
static void fill_step(cm_tensor *t, int64_t s, int which) {
  uint32_t *p = t->data;
  for (int64_t i = 0; i < BIG; i++)
    p[i] = (uint32_t)(s * 2654435761u) ^ (uint32_t)(i * 40503u) ^ (uint32_t)which;
}

static void test_sigkill_mid_write(void) {
  char dir[] = "/tmp/cmaec_ckpt_XXXXXX";
  make_dir(dir);
  cm_tensor big[2];
  cm_err err = {0};
  int64_t dims[] = {BIG};
  for (int i = 0; i < 2; i++)
    CHECK(cm_tensor_alloc(&big[i], cm_type_make(CM_F32, 1, dims), &err) == CM_OK);
  const char *bn[2] = {"params.w", "optimizer.exp_avg.w"};
  const cm_tensor *bp[2] = {&big[0], &big[1]};
  cm_checkpoint_meta m = {.step = 1, .epoch = 0, .rng_seed = 60, .config_json = "{\"x\":1}"};
  for (int i = 0; i < 2; i++) fill_step(&big[i], 1, i);
  CHECK(cm_checkpoint_save(dir, &m, 2, bn, bp, 3, NULL, &err) == CM_OK);
  bool landed = false;
  int tries = 0;
  int64_t next = 2;
  for (; tries < 40 && !landed; tries++) {
    pid_t pid = fork();
    if (pid == 0) {
      for (int64_t s = next;; s++) {
        cm_checkpoint_meta mc = m;
        mc.step = s;
        for (int i = 0; i < 2; i++) fill_step(&big[i], s, i);
        if (cm_checkpoint_save(dir, &mc, 2, bn, bp, 3, NULL, &err)) _exit(3);
      }
    }
    CHECK(pid > 0);
    if (pid <= 0) break;
    /* kill once a temp file shows up plus a few ms, so it lands mid-write */
    struct timespec ts = {0, 1000000};
    char tmp_seen[512] = "";
    for (int w = 0; w < 5000 && !tmp_seen[0]; w++) {
      nanosleep(&ts, NULL);
      DIR *d = opendir(dir);
      struct dirent *e;
      while (d && (e = readdir(d)))
        if (strstr(e->d_name, ".safetensors.tmp"))
          snprintf(tmp_seen, sizeof tmp_seen, "%s/%s", dir, e->d_name);
      if (d) closedir(d);
    }
    struct timespec extra = {0, (long)(1 + tries % 7) * 1000000L};
    nanosleep(&extra, NULL);
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    landed = tmp_seen[0] && file_exists(tmp_seen);
    char *lp;
    CHECK(cm_checkpoint_latest(dir, &lp, &err) == CM_OK);
    cm_tensor_set set;
    cm_checkpoint_meta got;
    cm_status st = cm_checkpoint_load(lp, &set, &got, &err);
    CHECK_MSG(st == CM_OK, "%s", err.msg);
    if (st == CM_OK) {
      CHECK(got.step >= 1 && got.rng_seed == 60 && set.n == 2);
      for (int i = 0; i < 2; i++) fill_step(&big[i], got.step, i);
      for (int i = 0; i < 2 && set.n == 2; i++) {
        const cm_tensor *t = cm_tensor_set_get(&set, bn[i]);
        CHECK(t && memcmp(t->data, big[i].data, (size_t)BIG * 4) == 0);
      }
      next = got.step + 1;
      cm_tensor_set_free(&set);
      cm_checkpoint_meta_free(&got);
    }
    free(lp);
  }
  CHECK_MSG(landed, "no kill landed mid-write in %d tries", tries);
  fprintf(stderr, "  kill landed mid-write after %d tries\n", tries);
  for (int i = 0; i < 2; i++) cm_tensor_free(&big[i]);
  remove_dir(dir);
}

TEST_MAIN(TEST(test_roundtrip), TEST(test_torn_and_corrupt),
          TEST(test_leftover_tmp_latest_and_keep), TEST(test_sigkill_mid_write))
