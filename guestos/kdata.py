"""The kernel's global data, at the image's ``kernel_data`` area.

The image header (at VIRT_BASE, hypervisor/public/native.py) says where that
area is; everything the kernel remembers between two native calls is here or
in pages it allocated and recorded here.
"""

from __future__ import annotations

from typing import Any

from guestos.layout import Layout
from hypervisor.public.native import pvlab_image_header

VIRT_BASE = 0xFFFFFFFF80000000
MAX_CPUS = 32
KSTACK_PAGES = 2

# the kernel's globals
KERNEL = Layout("kernel", [
    ("start_info", "u64"),     # VA of start_info
    ("shared_info", "u64"),    # VA where shared_info is mapped
    ("nr_pages", "u64"),
    ("mfn_list", "u64"),       # VA of the p2m list
    ("next_free_pfn", "u64"),  # bump allocator
    ("nr_cpus", "u64"),
    ("cpus_up", "u64"),
    ("tasks_live", "u64"),
    ("next_pid", "u64"),
    ("kernel_l4_pfn", "u64"),
    ("ticks", "u64"),
    ("free_head", "u64"),      # first pfn of the free-page list (0: empty)
    ("free_pages", "u64"),
    ("mem_map", "u64"),        # VA of the page flags, a byte per pfn
    ("next_cpu", "u64"),       # where the next spawned task goes
    ("hold_build_pid", "u64"), # options: stop a task's construction or teardown
    ("hold_build_ms", "u64"),  #   half way, leaving its pgd unpinned a while
    ("hold_exit_pid", "u64"),
    ("hold_exit_ms", "u64"),
    ("free_at_boot", "u64"),   # free pages before the first task: none may leak
    ("stop_test_ms", "u64"),   # option stopmachine=MS: a demonstration run at MS
    ("console_port", "u64"),   # the console ring's event channel (start_info)
    ("console_pfn", "u64"),    #   and its page
    ("store_port", "u64"),     # the xenstore ring's
    ("store_pfn", "u64"),
    ("xs_req_id", "u64"),      # the last xenstore request id
    ("xs_in_len", "u64"),      # bytes of a reply read from the ring, not yet whole
    ("xs_suspended", "u64"),   # xs_suspend .. xs_resume: no requests
    ("save_restore", "u64"),   # CONFIG_XEN_SAVE_RESTORE: 1 unless option nosaverestore
    ("shutting_down", "u64"),  # SHUTDOWN_* + 1 while a request is handled; 0: none
    ("shutdown_request", "u64"),  # SHUTDOWN_* + 1 for the xenwatch worker; 0: none
    ("freezing", "u64"),       # user tasks are frozen (picked by no cpu)
    ("wq_frozen", "u64"),      # freezable workers are frozen
    ("wq_runs", "u64"),        # times the freezable work has run (option worker=MS)
    ("wq_period_ms", "u64"),
    ("wq_next", "u64"),        #   and when it runs next (virtual ns)
    ("suspend_deadline", "u64"),  # freezing gives up after this (virtual ns)
    ("suspend_cancelled", "u64"),  # the suspend hypercall's result
    ("nr_devices", "u64"),
    ("pm_fail", "u64"),        # option pmfail=DEV:PHASE: (dev + 1) << 8 | phase + 1
    ("save_pinned", "u64"),    # pgds xen_mm_pin_all pinned for this save
    ("no_pin_all", "u64"),     # option nopinall: the suspend skips xen_mm_pin_all (a lab bug)
    ("restores", "u64"),       # times this kernel resumed in a new domain
    ("vballoon", "u64"),       # VA of the balloon driver's state page (0: no balloon)
    ("totalram_pages", "u64"), # the RAM the kernel counts as its own (less the balloon)
])
KERNEL_OFFSET = 0

# per-cpu data, an array after the globals
PERCPU = Layout("percpu", [
    ("stack_top", "u64"),
    ("timer_port", "u64"),
    ("ticks", "u64"),
    ("user_pgd", "u64"),        # pfn of the user L4 installed on this cpu (0: none)
    ("ipi_port", "u64"),
    ("stop_state", "u64"),      # stop_machine: the last state this cpu acknowledged
    ("in_stopper", "u64"),      # 1 while this cpu spins in stop_machine
    ("stop_saved_mask", "u64"), # its event mask before stop_machine masked it
    ("current", "u64"),         # task slot + 1 of the running task; 0: idle
    ("need_resched", "u64"),
    ("last", "u64"),            # slot that ran last, for round robin
    ("stop_seq", "u64"),        # the stop_machine this cpu joined last
    ("in_worker", "u64"),       # 1 while this cpu runs the xenwatch worker
])
PERCPU_OFFSET = 512
PERCPU_STRIDE = 128
assert PERCPU.size <= PERCPU_STRIDE

# a shared_info mapping the kernel makes at boot
SHARED_INFO_VA = VIRT_BASE - 0x1000


def header(cpu: Any) -> pvlab_image_header:
    return pvlab_image_header.from_buffer_copy(cpu.read(VIRT_BASE, 72))


def kernel(cpu: Any) -> Any:
    return KERNEL.at(cpu, header(cpu).kernel_data + KERNEL_OFFSET)


def percpu(cpu: Any, n: int | None = None) -> Any:
    n = cpu.vcpu_id if n is None else n
    return PERCPU.at(cpu, header(cpu).kernel_data + PERCPU_OFFSET + n * PERCPU_STRIDE)


# per-cpu scratch buffers for hypercall argument structs, after the per-cpu array
SCRATCH_OFFSET = PERCPU_OFFSET + MAX_CPUS * PERCPU_STRIDE
SCRATCH_SIZE = 256


def scratch_va(cpu: Any) -> int:
    return header(cpu).kernel_data + SCRATCH_OFFSET + cpu.vcpu_id * SCRATCH_SIZE


# the task table and the pgd_list, after the scratch buffers
MAX_TASKS = 64
TASKS_OFFSET = 16384
TASK_SIZE = 256
PGD_LIST_OFFSET = TASKS_OFFSET + MAX_TASKS * TASK_SIZE


# which cpu each event channel port is bound to (cpu + 1; 0: none), a byte a port
NR_PORTS = 4096  # the 2-level ABI's 64 x 64
PORT_CPU_OFFSET = PGD_LIST_OFFSET + MAX_TASKS * 8


# the stop_machine control block (guestos/stop_machine.py), after the port table
STOP_OFFSET = PORT_CPU_OFFSET + NR_PORTS


def port_cpu_va(cpu: Any) -> int:
    return header(cpu).kernel_data + PORT_CPU_OFFSET


def tasks_va(cpu: Any) -> int:
    return header(cpu).kernel_data + TASKS_OFFSET


def pgd_list_va(cpu: Any) -> int:
    return header(cpu).kernel_data + PGD_LIST_OFFSET


# xenbus: watches, queued watch events, a reply being read (guestos/xenbus.py)
XENBUS_OFFSET = STOP_OFFSET + 256
MAX_WATCHES = 8
WATCH_SIZE = 128               # u64 handler + 1 (0: free), path
MAX_XS_EVENTS = 8
XS_EVENT_SIZE = 256            # u64 length, the event's payload
XS_IN_SIZE = 16 + 4096         # one message: header and the largest payload
WATCHES_OFFSET = XENBUS_OFFSET
XS_EVENTS_OFFSET = WATCHES_OFFSET + MAX_WATCHES * WATCH_SIZE
XS_IN_OFFSET = XS_EVENTS_OFFSET + MAX_XS_EVENTS * XS_EVENT_SIZE

# the PM core's device list (guestos/pm.py)
DEVICES_OFFSET = XS_IN_OFFSET + XS_IN_SIZE
MAX_DEVICES = 16
DEVICE_SIZE = 16               # u64 driver, u64 instance
KDATA_END = DEVICES_OFFSET + MAX_DEVICES * DEVICE_SIZE
assert KDATA_END <= 65536, "kernel data outgrew KERNEL_DATA_SIZE (firmware/kernel/head.S)"


def kdata_va(cpu: Any, offset: int) -> int:
    return header(cpu).kernel_data + offset
