"""sched_op commands, shutdown reasons and argument structs
(xen/include/public/sched.h)."""

import ctypes

SCHEDOP_yield = 0
SCHEDOP_block = 1
SCHEDOP_shutdown = 2
SCHEDOP_poll = 3
SCHEDOP_remote_shutdown = 4
SCHEDOP_shutdown_code = 5
SCHEDOP_watchdog = 6
SCHEDOP_pin_override = 7

SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5


class sched_shutdown(ctypes.LittleEndianStructure):
    """SCHEDOP_shutdown and SCHEDOP_shutdown_code: the reason; 4 bytes."""
    _fields_ = [("reason", ctypes.c_uint32)]


class sched_poll(ctypes.LittleEndianStructure):
    """SCHEDOP_poll: block until one of ``nr_ports`` ports at ``ports`` is
    pending, or system time ``timeout`` (0: none); 24 bytes."""
    _fields_ = [("ports", ctypes.c_uint64), ("nr_ports", ctypes.c_uint32),
                ("timeout", ctypes.c_uint64)]


class sched_remote_shutdown(ctypes.LittleEndianStructure):
    """SCHEDOP_remote_shutdown: shut ``domain_id`` down for ``reason``; 8 bytes."""
    _fields_ = [("domain_id", ctypes.c_uint16), ("reason", ctypes.c_uint32)]


class sched_watchdog(ctypes.LittleEndianStructure):
    """SCHEDOP_watchdog: arm (id 0: a free timer), re-arm or, with timeout 0,
    disarm timer ``id``; timeout in seconds; 8 bytes."""
    _fields_ = [("id", ctypes.c_uint32), ("timeout", ctypes.c_uint32)]
