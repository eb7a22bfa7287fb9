"""The console ring (xen/include/public/io/console.h): one page shared by the
guest and the console daemon; ``out`` carries the guest's output, ``in`` its
input. Indices run free (hypervisor/public/io/ring.py)."""

from __future__ import annotations

import ctypes

XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048


class xencons_interface(ctypes.LittleEndianStructure):
    _fields_ = [
        ("in_", ctypes.c_char * XENCONS_IN_SIZE),
        ("out", ctypes.c_char * XENCONS_OUT_SIZE),
        ("in_cons", ctypes.c_uint32),
        ("in_prod", ctypes.c_uint32),
        ("out_cons", ctypes.c_uint32),
        ("out_prod", ctypes.c_uint32),
        ("connection", ctypes.c_uint8),  # XENCONSOLE_CONNECTED / _RECONNECT
    ]


IN_OFF = xencons_interface.in_.offset
IN_CONS_OFF = xencons_interface.in_cons.offset
IN_PROD_OFF = xencons_interface.in_prod.offset
OUT_OFF = xencons_interface.out.offset
OUT_CONS_OFF = xencons_interface.out_cons.offset
OUT_PROD_OFF = xencons_interface.out_prod.offset
