/* runtime/comm_tcp.c — placeholder, replaced below. */
#include "comm_impl.h"

cm_status cm_comm_tcp_open(cm_comm *c, cm_err *err) {
  return cm_errorf(err, CM_EINVALID, "comm: the tcp kind is not built yet");
}
