/* frontend/files.c — bounded file reads, shared by every reader (graph JSON and
 * text IR, model variants, safetensors, checkpoints, metrics, images).
 *
 * Only regular files are read: a directory, FIFO, character or block device or
 * socket is refused before a byte is read (a FIFO is opened without blocking,
 * so a reader never waits for a writer that will not come). Each reader passes
 * the cap its format allows; a file over it is refused from its size alone,
 * and a file that grows while it is read stops at the cap. */
#include "frontend.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a plain file";
}

/* "64 MiB", "1 GiB", or the bytes when not a whole number of MiB. */
static const char *size_str(size_t bytes, char *buf, size_t size) {
  if (bytes >= ((size_t)1 << 30) && bytes % ((size_t)1 << 30) == 0)
    snprintf(buf, size, "%zu GiB", bytes >> 30);
  else if (bytes >= ((size_t)1 << 20) && bytes % ((size_t)1 << 20) == 0)
    snprintf(buf, size, "%zu MiB", bytes >> 20);
  else
    snprintf(buf, size, "%zu-byte", bytes);
  return buf;
}

cm_status cm_file_open_regular(const char *path, int *fd_out, size_t *size, cm_err *err) {
  *fd_out = -1;
  *size = 0;
  if (!path || !*path) return cm_errorf(err, CM_EINVALID, "\"\": an empty file name");
  int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return cm_errorf(err, CM_EINVALID, "%s: cannot open: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return cm_errorf(err, CM_EINVALID, "%s: cannot stat: %s", path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return cm_errorf(err, CM_EINVALID, "%s: not a regular file (%s)", path, file_kind(sb.st_mode));
  }
  int flags = fcntl(fd, F_GETFL);
  if (flags >= 0) fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
  *fd_out = fd;
  *size = sb.st_size < 0 ? 0 : (size_t)sb.st_size;
  return CM_OK;
}

cm_status cm_read_file_max(const char *path, size_t max, const char *what, char **data, size_t *len,
                           cm_err *err) {
  *data = NULL;
  *len = 0;
  int fd;
  size_t size;
  cm_status st = cm_file_open_regular(path, &fd, &size, err);
  if (st) return st;
  char cap[32];
  if (size > max) {
    close(fd);
    return cm_errorf(err, CM_EINVALID, "%s: %zu bytes, more than the %s limit of %s", path, size,
                     size_str(max, cap, sizeof cap), what);
  }
  size_t alloc = size + 1, n = 0;
  char *buf = malloc(alloc);
  while (buf) {
    if (n + 1 >= alloc) { /* the file grew since fstat: on, up to the cap */
      if (n > max) break;
      size_t bigger = alloc * 2 > max + 2 ? max + 2 : alloc * 2;
      char *nb = realloc(buf, bigger);
      if (!nb) {
        free(buf);
        buf = NULL;
        break;
      }
      buf = nb;
      alloc = bigger;
    }
    ssize_t got = read(fd, buf + n, alloc - 1 - n);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      int e = errno;
      free(buf);
      close(fd);
      return cm_errorf(err, CM_EINVALID, "%s: cannot read: %s", path, strerror(e));
    }
    if (got == 0) break;
    n += (size_t)got;
  }
  close(fd);
  if (!buf) return cm_errorf(err, CM_EINTERNAL, "%s: out of memory reading the file", path);
  if (n > max) {
    free(buf);
    return cm_errorf(err, CM_EINVALID, "%s: more than the %s limit of %s (it grew while read)",
                     path, size_str(max, cap, sizeof cap), what);
  }
  buf[n] = '\0';
  *data = buf;
  *len = n;
  return CM_OK;
}

cm_status cm_read_file(const char *path, char **data, size_t *len, cm_err *err) {
  return cm_read_file_max(path, CM_MAX_TEXT_FILE_BYTES, "a graph or model file", data, len, err);
}

cm_status cm_file_map(const char *path, const uint8_t **data, size_t *len, cm_err *err) {
  *data = NULL;
  *len = 0;
  int fd;
  size_t size;
  cm_status st = cm_file_open_regular(path, &fd, &size, err);
  if (st) return st;
  if (size == 0) {
    close(fd);
    return CM_OK;
  }
  void *p = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int e = errno;
  close(fd);
  if (p == MAP_FAILED)
    return cm_errorf(err, e == ENOMEM ? CM_EINTERNAL : CM_EINVALID, "%s: cannot map %zu bytes: %s",
                     path, size, strerror(e));
  *data = p;
  *len = size;
  return CM_OK;
}

void cm_file_unmap(const uint8_t *data, size_t len) {
  if (data && len) munmap((void *)data, len);
}
