"""The xenstore wire protocol (xen/include/public/io/xs_wire.h): message
types, the errors sent as strings, the message header and the ring page the
guest shares with the store."""

from __future__ import annotations

import ctypes
import enum
import struct


class XsType(enum.IntEnum):
    XS_CONTROL = 0  # XS_DEBUG
    XS_DIRECTORY = 1
    XS_READ = 2
    XS_GET_PERMS = 3
    XS_WATCH = 4
    XS_UNWATCH = 5
    XS_TRANSACTION_START = 6
    XS_TRANSACTION_END = 7
    XS_INTRODUCE = 8
    XS_RELEASE = 9
    XS_GET_DOMAIN_PATH = 10
    XS_WRITE = 11
    XS_MKDIR = 12
    XS_RM = 13
    XS_SET_PERMS = 14
    XS_WATCH_EVENT = 15
    XS_ERROR = 16
    XS_IS_DOMAIN_INTRODUCED = 17
    XS_RESUME = 18
    XS_SET_TARGET = 19
    XS_RESET_WATCHES = 21  # 20 was XS_RESTRICT, removed
    XS_DIRECTORY_PART = 22


# errors travel as their names; these are the ones xs_wire.h lists
XSD_ERRORS = ("EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
              "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG")

# struct xsd_sockmsg: type, req_id, tx_id, len; the payload follows
XSD_SOCKMSG = struct.Struct("<IIII")

XS_WATCH_PATH, XS_WATCH_TOKEN = 0, 1

XENSTORE_RING_SIZE = 1024
XENSTORE_PAYLOAD_MAX = 4096
XENSTORE_ABS_PATH_MAX = 3072
XENSTORE_REL_PATH_MAX = 2048

XENSTORE_SERVER_FEATURE_RECONNECTION = 1
XENSTORE_SERVER_FEATURE_ERROR = 2
XENSTORE_CONNECTED, XENSTORE_RECONNECT = 0, 1


class xenstore_domain_interface(ctypes.LittleEndianStructure):
    _fields_ = [
        ("req", ctypes.c_char * XENSTORE_RING_SIZE),  # requests to the store
        ("rsp", ctypes.c_char * XENSTORE_RING_SIZE),  # replies and watch events
        ("req_cons", ctypes.c_uint32),
        ("req_prod", ctypes.c_uint32),
        ("rsp_cons", ctypes.c_uint32),
        ("rsp_prod", ctypes.c_uint32),
        ("server_features", ctypes.c_uint32),
        ("connection", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
    ]


REQ_OFF = xenstore_domain_interface.req.offset
RSP_OFF = xenstore_domain_interface.rsp.offset
REQ_CONS_OFF = xenstore_domain_interface.req_cons.offset
REQ_PROD_OFF = xenstore_domain_interface.req_prod.offset
RSP_CONS_OFF = xenstore_domain_interface.rsp_cons.offset
RSP_PROD_OFF = xenstore_domain_interface.rsp_prod.offset
CONNECTION_OFF = xenstore_domain_interface.connection.offset
