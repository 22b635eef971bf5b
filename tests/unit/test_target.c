/* tests/unit/test_target.c — cm_target: the one description of what code is
 * generated for (CPU lanes and GEMM defaults, CUDA arch limits). */
#include "codegen/codegen.h"
#include "tests/test.h"

static void test_cpu(void) {
  cm_target t;
  cm_err err = {0};
  unsetenv("CMAEC_CPU");
  CHECK_MSG(cm_target_cpu(NULL, NULL, &t, &err) == CM_OK, "%s", err.msg);
  CHECK(t.kind == CM_TARGET_CPU && !t.cpu.forced && t.cpu.runnable);
  CHECK(t.vector_lanes == t.cpu.vector_bits / 32);
  CHECK(t.vector_lanes == 4 || t.vector_lanes == 8 || t.vector_lanes == 16);
  /* the register block is whole vectors, the cache blocks whole register blocks */
  CHECK(t.gemm.nr % t.vector_lanes == 0 && t.gemm.mc % t.gemm.mr == 0 &&
        t.gemm.nc % t.gemm.nr == 0 && t.gemm.kc > 0);
  CHECK(t.sm == 0 && t.shared_bytes_max == 0);
  cm_target h;
  cm_target_host(&h);
  CHECK(h.vector_lanes == t.vector_lanes && !strcmp(h.arch, t.arch));
  /* named CPUs: their own widths, whatever this host is */
  CHECK(cm_target_cpu("x86-64-v4", NULL, &t, &err) == CM_OK && t.vector_lanes == 16 &&
        t.gemm.nr == 64);
  CHECK(cm_target_cpu("x86-64-v3", NULL, &t, &err) == CM_OK && t.vector_lanes == 8 &&
        t.gemm.nr == 16);
  CHECK(cm_target_cpu("x86-64-v4", "-avx512f", &t, &err) == CM_OK && t.vector_lanes == 8);
  CHECK(cm_target_cpu("no-such-cpu", NULL, &t, &err) == CM_EINVALID);
  CHECK_STR_CONTAINS(err.msg, "no-such-cpu");
  /* an invalid $CMAEC_CPU: the host is the default, the error is the builder's */
  setenv("CMAEC_CPU", "no-such-cpu", 1);
  cm_target_host(&t);
  CHECK(t.kind == CM_TARGET_CPU && !t.cpu.forced && t.vector_lanes == h.vector_lanes);
  unsetenv("CMAEC_CPU");
}

static void test_cuda(void) {
  cm_target t;
  cm_err err = {0};
  CHECK_MSG(cm_target_cuda("sm_80", &t, &err) == CM_OK, "%s", err.msg);
  CHECK(t.kind == CM_TARGET_CUDA && t.sm == 80 && t.mma_bf16 && t.warp_size == 32);
  CHECK(t.shared_bytes_max == 163 * 1024 && t.shared_bytes_static == 48 * 1024);
  CHECK(cm_target_cuda("sm_90a", &t, &err) == CM_OK && t.sm == 90 && !strcmp(t.arch, "sm_90a"));
  CHECK(t.shared_bytes_max == 227 * 1024 && t.max_regs_per_thread == 255);
  CHECK(cm_target_cuda("sm_75", &t, &err) == CM_OK && !t.mma_bf16);
  const char *bad[] = {"sm_7", "sm_60", "gfx90a", "sm_90b", "", NULL};
  for (int i = 0; bad[i]; i++) {
    CHECK_MSG(cm_target_cuda(bad[i], &t, &err) == CM_EINVALID, "%s accepted", bad[i]);
    CHECK_STR_CONTAINS(err.msg, "expected sm_XY");
  }
  char line[512];
  FILE *f = fmemopen(line, sizeof line, "w");
  cm_target_cuda("sm_90", &t, &err);
  cm_target_print(&t, f);
  fclose(f);
  CHECK_STR_CONTAINS(line, "cuda sm_90");
  CHECK_STR_CONTAINS(line, "227 KiB opt-in");
}

TEST_MAIN({"cpu", test_cpu}, {"cuda", test_cuda})
