"""callback_op (xen/include/public/callback.h)."""

import ctypes

CALLBACKOP_register = 0
CALLBACKOP_unregister = 1

CALLBACKTYPE_event = 0
CALLBACKTYPE_failsafe = 1
CALLBACKTYPE_syscall = 2
CALLBACKTYPE_sysenter_deprecated = 3
CALLBACKTYPE_nmi = 4
CALLBACKTYPE_sysenter = 5
CALLBACKTYPE_syscall32 = 7

_CALLBACKF_mask_events = 0
CALLBACKF_mask_events = 1 << _CALLBACKF_mask_events


class callback_register(ctypes.LittleEndianStructure):
    """struct callback_register (callback.h), 16 bytes on x86-64."""
    _fields_ = [("type", ctypes.c_uint16), ("flags", ctypes.c_uint16),
                ("address", ctypes.c_uint64)]


class callback_unregister(ctypes.LittleEndianStructure):
    """struct callback_unregister (callback.h), 4 bytes."""
    _fields_ = [("type", ctypes.c_uint16), ("_unused", ctypes.c_uint16)]
