/* runtime/cuda_driver.c — the CUDA driver API loaded with dlopen into one
 * cm_cuda_driver table (the only place cmaec resolves driver symbols), its
 * errors as messages, and the devices it sees. */
#include "runtime.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static cm_cuda_driver loaded;
static cm_err load_err;
static cm_status load_status = CM_OK;
static pthread_once_t load_once = PTHREAD_ONCE_INIT;

/* Resolves name into *slot; false (naming it in load_err) when the library lacks it. */
static bool resolve(void *lib, void *slot, const char *name) {
  void *sym = dlsym(lib, name);
  memcpy(slot, &sym, sizeof sym);
  if (sym) return true;
  load_status =
      cm_errorf(&load_err, CM_EINVALID, "CUDA driver %s lacks %s (a driver older than CUDA 12?)",
                loaded.name, name);
  return false;
}

static void load_driver(void) {
  const char *override = getenv("CMAEC_CUDA_DRIVER_LIBRARY");
  const char *const only[] = {override, NULL};
  static const char *const names[] = {"libcuda.so.1", "libcuda.so", NULL};
  char why[400];
  void *lib = cm_dlopen_first(override && *override ? only : names, why, sizeof why);
  if (!lib) {
    load_status =
        cm_errorf(&load_err, CM_EINVALID, "CUDA driver not found: %s (no NVIDIA driver here)", why);
    return;
  }
  loaded.name = override && *override ? override : "libcuda.so.1";
  cm_cuda_driver *d = &loaded;
  /* the _v2/_v3 entry points are the ones cuda.h maps the plain names to */
  bool ok = resolve(lib, &d->init, "cuInit") &&
            resolve(lib, &d->driver_get_version, "cuDriverGetVersion") &&
            resolve(lib, &d->device_get_count, "cuDeviceGetCount") &&
            resolve(lib, &d->device_get, "cuDeviceGet") &&
            resolve(lib, &d->device_get_name, "cuDeviceGetName") &&
            resolve(lib, &d->device_total_mem, "cuDeviceTotalMem_v2") &&
            resolve(lib, &d->device_get_attribute, "cuDeviceGetAttribute") &&
            resolve(lib, &d->primary_ctx_retain, "cuDevicePrimaryCtxRetain") &&
            resolve(lib, &d->primary_ctx_release, "cuDevicePrimaryCtxRelease_v2") &&
            resolve(lib, &d->ctx_set_current, "cuCtxSetCurrent") &&
            resolve(lib, &d->ctx_synchronize, "cuCtxSynchronize") &&
            resolve(lib, &d->mem_get_info, "cuMemGetInfo_v2") &&
            resolve(lib, &d->mem_alloc, "cuMemAlloc_v2") &&
            resolve(lib, &d->mem_free, "cuMemFree_v2") &&
            resolve(lib, &d->mem_alloc_host, "cuMemAllocHost_v2") &&
            resolve(lib, &d->mem_free_host, "cuMemFreeHost") &&
            resolve(lib, &d->memcpy_htod_async, "cuMemcpyHtoDAsync_v2") &&
            resolve(lib, &d->memcpy_dtoh_async, "cuMemcpyDtoHAsync_v2") &&
            resolve(lib, &d->memcpy_dtod_async, "cuMemcpyDtoDAsync_v2") &&
            resolve(lib, &d->memset_d8_async, "cuMemsetD8Async") &&
            resolve(lib, &d->stream_create, "cuStreamCreate") &&
            resolve(lib, &d->stream_destroy, "cuStreamDestroy_v2") &&
            resolve(lib, &d->stream_synchronize, "cuStreamSynchronize") &&
            resolve(lib, &d->stream_wait_event, "cuStreamWaitEvent") &&
            resolve(lib, &d->event_create, "cuEventCreate") &&
            resolve(lib, &d->event_destroy, "cuEventDestroy_v2") &&
            resolve(lib, &d->event_record, "cuEventRecord") &&
            resolve(lib, &d->event_synchronize, "cuEventSynchronize") &&
            resolve(lib, &d->event_elapsed_time, "cuEventElapsedTime") &&
            resolve(lib, &d->module_load_data, "cuModuleLoadData") &&
            resolve(lib, &d->module_unload, "cuModuleUnload") &&
            resolve(lib, &d->module_get_function, "cuModuleGetFunction") &&
            resolve(lib, &d->func_set_attribute, "cuFuncSetAttribute") &&
            resolve(lib, &d->launch_kernel, "cuLaunchKernel") &&
            resolve(lib, &d->stream_begin_capture, "cuStreamBeginCapture_v2") &&
            resolve(lib, &d->stream_end_capture, "cuStreamEndCapture") &&
            resolve(lib, &d->graph_instantiate, "cuGraphInstantiateWithFlags") &&
            resolve(lib, &d->graph_launch, "cuGraphLaunch") &&
            resolve(lib, &d->graph_exec_destroy, "cuGraphExecDestroy") &&
            resolve(lib, &d->graph_destroy, "cuGraphDestroy") &&
            resolve(lib, &d->get_error_name, "cuGetErrorName") &&
            resolve(lib, &d->get_error_string, "cuGetErrorString");
  if (!ok) return;
  int rc = d->init(0);
  if (rc != 0) {
    const char *nm = "?", *text = "?";
    d->get_error_name(rc, &nm);
    d->get_error_string(rc, &text);
    load_status = cm_errorf(&load_err, CM_EINVALID, "cuInit: %s (%s): no usable GPU", nm, text);
  }
  /* Kept loaded for the process: unloading the driver is not supported while contexts live. */
}

cm_status cm_cuda_driver_load(const cm_cuda_driver **out, cm_err *err) {
  pthread_once(&load_once, load_driver);
  *out = NULL;
  if (load_status != CM_OK) {
    if (err) *err = load_err;
    return load_status;
  }
  *out = &loaded;
  return CM_OK;
}

cm_status cm_cuda_check(const cm_cuda_driver *d, int result, const char *what, cm_err *err) {
  if (result == 0) return CM_OK;
  const char *name = NULL, *text = NULL;
  if (d->get_error_name) d->get_error_name(result, &name);
  if (d->get_error_string) d->get_error_string(result, &text);
  return cm_errorf(err, CM_EINTERNAL, "%s: %s (%s)", what, name ? name : "CUDA_ERROR_UNKNOWN",
                   text ? text : "no description");
}

void cm_cuda_arch_for(int major, int minor, char *arch, size_t size) {
  if (major >= 9)
    snprintf(arch, size, "sm_90");
  else if (major == 8)
    snprintf(arch, size, "sm_80");
  else
    snprintf(arch, size, "sm_%d%d", major, minor);
}

int cm_cuda_devices(const cm_cuda_driver *d, cm_cuda_device *out, int max, cm_err *err) {
  int n = 0;
  if (cm_cuda_check(d, d->device_get_count(&n), "cuDeviceGetCount", err) != CM_OK) return 0;
  for (int i = 0; i < n && i < max; i++) {
    cm_cuda_device *v = &out[i];
    memset(v, 0, sizeof *v);
    v->ordinal = i;
    int dev = 0;
    size_t bytes = 0;
    if (cm_cuda_check(d, d->device_get(&dev, i), "cuDeviceGet", err) != CM_OK ||
        cm_cuda_check(d, d->device_get_name(v->name, (int)sizeof v->name, dev), "cuDeviceGetName",
                      err) != CM_OK ||
        cm_cuda_check(d, d->device_total_mem(&bytes, dev), "cuDeviceTotalMem", err) != CM_OK ||
        cm_cuda_check(d, d->device_get_attribute(&v->cc_major, CM_CU_ATTR_CC_MAJOR, dev),
                      "cuDeviceGetAttribute", err) != CM_OK ||
        cm_cuda_check(d, d->device_get_attribute(&v->cc_minor, CM_CU_ATTR_CC_MINOR, dev),
                      "cuDeviceGetAttribute", err) != CM_OK ||
        cm_cuda_check(d, d->device_get_attribute(&v->sms, CM_CU_ATTR_MULTIPROCESSOR_COUNT, dev),
                      "cuDeviceGetAttribute", err) != CM_OK ||
        cm_cuda_check(
            d,
            d->device_get_attribute(&v->shared_optin, CM_CU_ATTR_MAX_SHARED_PER_BLOCK_OPTIN, dev),
            "cuDeviceGetAttribute", err) != CM_OK)
      return 0;
    v->total_bytes = (int64_t)bytes;
    cm_cuda_arch_for(v->cc_major, v->cc_minor, v->arch, sizeof v->arch);
  }
  return n;
}
