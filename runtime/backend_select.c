/* runtime/backend_select.c — --backend auto|cpu|cuda|ref, --device, --cuda-graphs:
 * the one place that turns what a user asked for into a target and backend options. */
#include "runtime.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

static const char *const kind_names[] = {"auto", "cpu", "cuda", "ref"};

const char *cm_backend_kind_name(cm_backend_kind k) {
  return (unsigned)k < sizeof kind_names / sizeof kind_names[0] ? kind_names[k] : "?";
}

cm_status cm_backend_parse(const char *name, bool ref_allowed, cm_backend_kind *out, cm_err *err) {
  for (int k = 0; k < (int)(sizeof kind_names / sizeof kind_names[0]); k++) {
    if (!name || strcmp(name, kind_names[k]) != 0) continue;
    if (k == CM_BACKEND_REF && !ref_allowed) break;
    *out = (cm_backend_kind)k;
    return CM_OK;
  }
  return cm_errorf(err, CM_EINVALID, "--backend %s: unknown backend (available: auto, cpu, cuda%s)",
                   name ? name : "(none)", ref_allowed ? ", ref" : "");
}

cm_status cm_backend_parse_graphs(const char *value, cm_cuda_graphs *out, cm_err *err) {
  if (value && strcmp(value, "on") == 0) {
    *out = CM_CUDA_GRAPHS_ON;
  } else if (value && strcmp(value, "off") == 0) {
    *out = CM_CUDA_GRAPHS_OFF;
  } else {
    return cm_errorf(err, CM_EINVALID, "--cuda-graphs %s: expected on or off",
                     value ? value : "(none)");
  }
  return CM_OK;
}

cm_status cm_backend_parse_device(const char *value, int *out, cm_err *err) {
  char *end = NULL;
  errno = 0;
  long v = value ? strtol(value, &end, 10) : -1;
  if (!value || !*value || *end || errno || v < 0 || v > 1023)
    return cm_errorf(err, CM_EINVALID, "--device %s: expected a GPU ordinal (0, 1, ...)",
                     value ? value : "(none)");
  *out = (int)v;
  return CM_OK;
}

/* The device req asks for on driver d, its target and the backend options. */
static cm_status resolve_cuda(const cm_backend_request *req, const cm_cuda_driver *d,
                              cm_backend_choice *out, cm_err *err) {
  enum { MAX_DEVICES = 64 };
  cm_cuda_device devs[MAX_DEVICES];
  cm_err derr = {0};
  int n = cm_cuda_devices(d, devs, MAX_DEVICES, &derr);
  if (n == 0 && derr.status)
    return cm_errorf(err, derr.status, "--backend cuda: listing the GPUs of %s: %s", d->name,
                     derr.msg);
  if (n == 0)
    return cm_errorf(err, CM_EINVALID, "--backend cuda: the CUDA driver (%s) sees no GPU", d->name);
  if (req->device >= n || req->device >= MAX_DEVICES)
    return cm_errorf(err, CM_EINVALID,
                     "--device %d: the CUDA driver (%s) sees %d GPU%s (ordinals 0..%d; "
                     "CUDA_VISIBLE_DEVICES selects which)",
                     req->device, d->name, n, n == 1 ? "" : "s", n - 1);
  out->device = devs[req->device];
  if (cm_target_cuda(out->device.arch, &out->target, err))
    return cm_err_prefix(err, "--device %d (%s): ", req->device, out->device.name);
  out->kind = CM_BACKEND_CUDA;
  out->cuda.driver = d;
  out->cuda.compiler = req->compiler;
  out->cuda.device = req->device;
  out->cuda.graphs = req->graphs;
  snprintf(out->description, sizeof out->description,
           "cuda %d (%s, %s, %d SMs, %.1f GiB; CUDA graphs %s)", req->device, out->device.name,
           out->device.arch, out->device.sms, (double)out->device.total_bytes / (1 << 30),
           req->graphs == CM_CUDA_GRAPHS_ON ? "on" : "off");
  return CM_OK;
}

cm_status cm_backend_resolve(const cm_backend_request *req, cm_backend_choice *out, cm_err *err) {
  memset(out, 0, sizeof *out);
  out->kind = req->kind;
  if (req->kind == CM_BACKEND_CPU && !cm_have_cpu_backend())
    return cm_errorf(err, CM_EINVALID, "--backend cpu: %s", CM_NO_CPU_BACKEND_MESSAGE);
  if (req->kind == CM_BACKEND_CPU || req->kind == CM_BACKEND_REF) {
    cm_target_host(&out->target);
    snprintf(out->description, sizeof out->description, "%s", cm_backend_kind_name(req->kind));
    return CM_OK;
  }
  if (req->kind != CM_BACKEND_CUDA && req->kind != CM_BACKEND_AUTO)
    return cm_errorf(err, CM_EINVALID, "cm_backend_resolve: unknown backend kind %d",
                     (int)req->kind);
  const cm_cuda_driver *d = req->driver;
  cm_err lerr = {0};
  /* a driver given (the tests' emulated one) is initialized as the loader does its own */
  cm_status st =
      d ? cm_cuda_check(d, d->init(0), "cuInit(0)", &lerr) : cm_cuda_driver_load(&d, &lerr);
  if (!st) st = resolve_cuda(req, d, out, &lerr);
  if (req->kind == CM_BACKEND_CUDA || st == CM_OK) {
    if (st) *err = lerr;
    if (!st && req->kind == CM_BACKEND_AUTO) {
      size_t len = strlen(out->description);
      snprintf(out->description + len, sizeof out->description - len, " (auto)");
    }
    return st;
  }
  /* auto without a usable GPU: the CPU (the oracle in a build without LLVM), saying why */
  const char *why = !d && strncmp(lerr.msg, "CUDA driver not found", 21) == 0 ? "no CUDA driver"
                    : !d                                    ? "CUDA driver unusable"
                    : strstr(lerr.msg, "sees no GPU")       ? "no CUDA GPU"
                    : strncmp(lerr.msg, "--device", 8) == 0 ? "no such CUDA device"
                                                            : "CUDA unusable";
  memset(out, 0, sizeof *out);
  out->kind = cm_have_cpu_backend() ? CM_BACKEND_CPU : CM_BACKEND_REF;
  cm_target_host(&out->target);
  snprintf(out->description, sizeof out->description, "%s (auto: %s)",
           cm_backend_kind_name(out->kind), why);
  return CM_OK;
}

const cm_target *cm_backend_compile_opts(cm_backend_choice *c, cm_compile_opts *co) {
  if (c->kind != CM_BACKEND_CUDA) return NULL;
  co->backend_opts = &c->cuda;
  return &c->target;
}
