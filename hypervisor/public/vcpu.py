"""vcpu_op commands and argument structs (xen/include/public/vcpu.h)."""

import ctypes

VCPUOP_initialise = 0
VCPUOP_up = 1
VCPUOP_down = 2
VCPUOP_is_up = 3
VCPUOP_get_runstate_info = 4
VCPUOP_register_runstate_memory_area = 5
VCPUOP_set_periodic_timer = 6
VCPUOP_stop_periodic_timer = 7
VCPUOP_set_singleshot_timer = 8
VCPUOP_stop_singleshot_timer = 9
VCPUOP_register_vcpu_info = 10
VCPUOP_send_nmi = 11

# a VCPU's runstate: running, runnable (waiting for a CPU), blocked, offline
RUNSTATE_running = 0
RUNSTATE_runnable = 1
RUNSTATE_blocked = 2
RUNSTATE_offline = 3


class vcpu_runstate_info(ctypes.LittleEndianStructure):
    """VCPUOP_get_runstate_info: the state, when it was entered, and the time
    spent in each state (ns of system time); 48 bytes."""
    _fields_ = [("state", ctypes.c_int32), ("state_entry_time", ctypes.c_uint64),
                ("time", ctypes.c_uint64 * 4)]


class vcpu_set_periodic_timer(ctypes.LittleEndianStructure):
    """VCPUOP_set_periodic_timer: VIRQ_TIMER every ``period_ns``; 8 bytes."""
    _fields_ = [("period_ns", ctypes.c_uint64)]


class vcpu_set_singleshot_timer(ctypes.LittleEndianStructure):
    """VCPUOP_set_singleshot_timer: VIRQ_TIMER at system time ``timeout_abs_ns``;
    16 bytes."""
    _fields_ = [("timeout_abs_ns", ctypes.c_uint64), ("flags", ctypes.c_uint32)]
