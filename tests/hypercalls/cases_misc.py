"""Portable hypercall cases for event channels, sched_op, vcpu_op, callbacks, traps,
xen_version, console_io and vm_assist.
The step format is described in tests/hypercalls/portable.py; the shared
constants are in tests/hypercalls/steps.py."""

from __future__ import annotations

from hypervisor.public.arch_x86 import FLAT_KERNEL_CS64, HYPERVISOR_VIRT_START
from hypervisor.public.callback import (
    CALLBACKOP_register,
    CALLBACKOP_unregister,
    CALLBACKTYPE_event,
    CALLBACKTYPE_nmi,
    CALLBACKTYPE_syscall32,
    CALLBACKTYPE_sysenter,
    CALLBACKTYPE_sysenter_deprecated,
)
from hypervisor.public.errno import EEXIST, EFAULT, EINVAL, ENOENT, ENOSYS, EPERM, ESRCH
from hypervisor.public.event_channel import (
    EVTCHNOP_alloc_unbound,
    EVTCHNOP_bind_interdomain,
    EVTCHNOP_bind_ipi,
    EVTCHNOP_bind_vcpu,
    EVTCHNOP_bind_virq,
    EVTCHNOP_close,
    EVTCHNOP_send,
    EVTCHNOP_status,
    EVTCHNOP_unmask,
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_ipi,
    EVTCHNSTAT_unbound,
    EVTCHNSTAT_virq,
)
from hypervisor.public.sched import (
    SCHEDOP_pin_override,
    SCHEDOP_poll,
    SCHEDOP_remote_shutdown,
    SCHEDOP_shutdown_code,
    SCHEDOP_watchdog,
    SHUTDOWN_poweroff,
)
from hypervisor.public.vcpu import (
    RUNSTATE_running,
    VCPUOP_get_runstate_info,
    VCPUOP_initialise,
    VCPUOP_send_nmi,
    VCPUOP_set_periodic_timer,
    VCPUOP_set_singleshot_timer,
    VCPUOP_stop_periodic_timer,
    VCPUOP_stop_singleshot_timer,
)
from hypervisor.public.version import (
    XENFEAT_direct_mapped,
    XENFEAT_dm_msix_all_writes,
    XENFEAT_gnttab_map_avail_bits,
    XENFEAT_highmem_assist,
    XENFEAT_memory_op_vnode_supported,
    XENFEAT_mmu_pt_update_preserve_ad,
    XENFEAT_runstate_phys_area,
    XENFEAT_vcpu_time_phys_area,
)
from hypervisor.public.xen import (
    DOMID_SELF,
    VIRQ_DEBUG,
    VIRQ_DEBUGGER,
    VIRQ_ENOMEM,
    CONSOLEIO_read,
    CONSOLEIO_write,
    Hypercall,
    VMASST_CMD_disable,
    VMASST_CMD_enable,
    VMASST_TYPE_m2p_strict,
    VMASST_TYPE_writable_pagetables,
    XENVER_build_id,
    XENVER_capabilities,
    XENVER_changeset,
    XENVER_commandline,
    XENVER_compile_info,
    XENVER_extraversion,
    XENVER_get_features,
    XENVER_guest_handle,
    XENVER_pagesize,
    XENVER_platform_parameters,
)
from tests.hypercalls.steps import BUF, OWN_DOMID, struct, word

EVTCHN = Hypercall.event_channel_op
BAD_PORT = 5000  # beyond every port of the 2-level ABI (4096)

# A struct step leaves the buffer as Xen wrote it back: ("out", 4 * i) is its
# 32-bit field i for the next steps, so a port given back, or echoed by the
# next command on it, stays there until a later struct overwrites it.


def evtchn(cmd: int, fields: list, rc: int) -> tuple:
    return struct(fields, EVTCHN, cmd, BUF, rc)


def close(port: object) -> tuple:
    return evtchn(EVTCHNOP_close, [port], 0)


def status(port: object, rc: int = 0) -> tuple:
    """EVTCHNOP_status of one's own port: struct evtchn_status {dom, port,
    status, vcpu, union}; the state comes back in word 2, the vcpu in word 3."""
    return evtchn(EVTCHNOP_status, [DOMID_SELF, port, 0, 0, 0, 0], rc)


EVTCHN_CASES: dict[str, list[tuple]] = {
    # event_channel.c evtchn_bind_virq, virq_is_global: VIRQ_DEBUGGER is global
    "bind_virq_debugger_vcpu1": [evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUGGER, 1, 0], -EINVAL)],
    # evtchn_unmask: port_is_valid covers the whole first bucket, port 0 and free ports too
    "unmask_port0_and_free_port": [evtchn(EVTCHNOP_unmask, [0], 0),
                                   evtchn(EVTCHNOP_unmask, [63], 0)],
    # evtchn_bind_vcpu: the vcpu first (-ENOENT); IPI and per-vcpu VIRQ ports do not
    # move (-EINVAL), a global VIRQ's port does
    "bind_vcpu_rules": [
        evtchn(EVTCHNOP_bind_vcpu, [BAD_PORT, 99], -ENOENT),
        evtchn(EVTCHNOP_bind_vcpu, [BAD_PORT, 0], -EINVAL),
        evtchn(EVTCHNOP_bind_ipi, [0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, [("out", 4), 0], -EINVAL), close(("out", 0)),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUG, 0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, [("out", 8), 0], -EINVAL), close(("out", 0)),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_ENOMEM, 0, 0], 0),
        evtchn(EVTCHNOP_bind_vcpu, [("out", 8), 0], 0), close(("out", 0))],
    # evtchn_alloc_unbound: the local domain is looked up first
    "alloc_unbound_unknown_domain": [evtchn(EVTCHNOP_alloc_unbound, [77 | DOMID_SELF << 16, 0],
                                            -ESRCH)],
    # evtchn_status: every state, as event_channel.c gives it
    "evtchn_status": [
        status(0), word(2, EVTCHNSTAT_closed),
        status(63), word(2, EVTCHNSTAT_closed),
        status(BAD_PORT, -EINVAL),
        evtchn(EVTCHNOP_status, [77, 0, 0, 0, 0, 0], -ESRCH),
        evtchn(EVTCHNOP_bind_ipi, [0, 0], 0), status(("out", 4)),
        word(2, EVTCHNSTAT_ipi), word(3, 0), close(("out", 4)),
        evtchn(EVTCHNOP_bind_virq, [VIRQ_DEBUG, 0, 0], 0), status(("out", 8)),
        word(2, EVTCHNSTAT_virq), word(4, VIRQ_DEBUG), close(("out", 4))],
    # evtchn_bind_interdomain to one's own unbound port (loopback); status of
    # both ends; closing one end leaves the other unbound again. Ports: U in
    # field 1 after alloc_unbound, L in field 2 after the bind; status(L) gives
    # back L in field 1 and U in field 5 (u.interdomain.port)
    "evtchn_loopback": [
        evtchn(EVTCHNOP_alloc_unbound, [DOMID_SELF | DOMID_SELF << 16, 0], 0),
        status(("out", 4)), word(2, EVTCHNSTAT_unbound), word(4, OWN_DOMID),
        evtchn(EVTCHNOP_bind_interdomain, [DOMID_SELF, ("out", 4), 0], 0),
        status(("out", 8)), word(2, EVTCHNSTAT_interdomain), word(4, OWN_DOMID),
        evtchn(EVTCHNOP_send, [("out", 4)], 0),  # a struct of one port: L in field 0
        close(("out", 0)), status(("out", 20)), word(2, EVTCHNSTAT_unbound),
        close(("out", 4))],
}

CASES: dict[str, list[tuple]] = {**EVTCHN_CASES}

NONCANONICAL = 1 << 63
CANONICAL = 0xFFFF_8400_0000_0000  # the address matters only for its form
# what XENVER_get_features submap 0 gives a 64-bit PV domU on Xen 4.19
# (common/kernel.c do_xen_version): not translated, so direct mapped
PV_FEATURES = sum(1 << b for b in (
    XENFEAT_memory_op_vnode_supported, XENFEAT_vcpu_time_phys_area,
    XENFEAT_runstate_phys_area, XENFEAT_mmu_pt_update_preserve_ad, XENFEAT_highmem_assist,
    XENFEAT_gnttab_map_avail_bits, XENFEAT_dm_msix_all_writes, XENFEAT_direct_mapped))
DENIED = int.from_bytes(b"<den", "little")  # the first word of "<denied>"


def callback(cmd: int, cb_type: int, address: int, rc: int) -> tuple:
    """struct callback_register {type, flags; address} (callback_unregister
    is its first word)."""
    return struct([cb_type, 0, ("q", address)], Hypercall.callback_op, cmd, BUF, rc)


def xen_version(cmd: int, arg: object, rc: int) -> tuple:
    return ("hypercall", Hypercall.xen_version, cmd, arg, rc)


MISC_CASES: dict[str, list[tuple]] = {
    # arch/x86/pv/callback.c register_guest_callback: the address must be
    # canonical whatever the type; unknown types -ENOSYS; syscall32 and sysenter
    # are accepted (a 64-bit guest never takes them)
    "callback_register": [
        callback(CALLBACKOP_register, CALLBACKTYPE_event, NONCANONICAL, -EINVAL),
        callback(CALLBACKOP_register, CALLBACKTYPE_sysenter_deprecated, CANONICAL, -ENOSYS),
        callback(CALLBACKOP_register, CALLBACKTYPE_syscall32, CANONICAL, 0),
        callback(CALLBACKOP_register, CALLBACKTYPE_sysenter, CANONICAL, 0)],
    # unregister_guest_callback: only the NMI callback can be unregistered
    "callback_nmi": [callback(CALLBACKOP_register, CALLBACKTYPE_nmi, CANONICAL, 0),
                     callback(CALLBACKOP_unregister, CALLBACKTYPE_nmi, 0, 0),
                     callback(CALLBACKOP_unregister, CALLBACKTYPE_event, 0, -EINVAL),
                     callback(CALLBACKOP_unregister, 6, 0, -ENOSYS)],
    # do_callback_op: an unknown command never reads its argument
    "callback_unknown_command": [("hypercall", Hypercall.callback_op, 7, 0x1000, -ENOSYS)],
    # do_set_trap_table: a handler must be canonical
    "trap_table_noncanonical": [struct([200 | FLAT_KERNEL_CS64 << 16, 0, ("q", NONCANONICAL),
                                            0, 0, 0, 0], Hypercall.set_trap_table, BUF, -EINVAL)],
    # common/kernel.c do_xen_version, with the dummy XSM policy's answers for a domU
    "xen_version_subops": [
        xen_version(XENVER_pagesize, BUF, -EINVAL),
        struct([0, 0], Hypercall.xen_version, XENVER_get_features, BUF, 0),
        word(1, PV_FEATURES),
        struct([1, 0], Hypercall.xen_version, XENVER_get_features, BUF, -EINVAL),
        xen_version(XENVER_get_features, 0x1000, -EFAULT),
        xen_version(XENVER_guest_handle, BUF, 0),
        struct([0], Hypercall.xen_version, XENVER_commandline, BUF, 0),
        word(0, DENIED),
        xen_version(XENVER_build_id, BUF, -EPERM),
        xen_version(XENVER_extraversion, "free_va", 0),
        xen_version(XENVER_compile_info, "free_va", 0),
        xen_version(XENVER_capabilities, "free_va", 0),
        xen_version(XENVER_changeset, "free_va", 0),
        struct([0, 0], Hypercall.xen_version, XENVER_platform_parameters, BUF, 0),
        word(0, HYPERVISOR_VIRT_START & 0xFFFFFFFF),
        word(1, HYPERVISOR_VIRT_START >> 32),
        xen_version(XENVER_extraversion, 0x1000, -EFAULT),
        xen_version(11, 0, -ENOSYS)],
    # drivers/char/console.c do_console_io with xsm_console_io (include/xsm/dummy.h)
    # of a debug build (CONFIG_VERBOSE_DEBUG): a domU may write, nothing else
    "console_io_domu": [("hypercall", Hypercall.console_io, CONSOLEIO_write, 0, BUF, 0),
                        ("hypercall", Hypercall.console_io, CONSOLEIO_read, 16, BUF, -EPERM),
                        ("hypercall", Hypercall.console_io, 7, 0, 0, -EPERM)],
    # common/domain.c do_vm_assist: a type valid for 64-bit PV, else -EINVAL;
    # an unknown command -ENOSYS
    "vm_assist": [("hypercall", Hypercall.vm_assist, VMASST_CMD_enable,
                   VMASST_TYPE_writable_pagetables, 0),
                  ("hypercall", Hypercall.vm_assist, VMASST_CMD_disable,
                   VMASST_TYPE_writable_pagetables, 0),
                  ("hypercall", Hypercall.vm_assist, VMASST_CMD_enable, 31, -EINVAL),
                  ("hypercall", Hypercall.vm_assist, VMASST_CMD_enable, 64, -EINVAL),
                  ("hypercall", Hypercall.vm_assist, 5, VMASST_TYPE_m2p_strict, -ENOSYS)],
}

CASES.update(MISC_CASES)


def sched(cmd: int, fields: list, rc: int) -> tuple:
    return struct(fields, Hypercall.sched_op, cmd, BUF, rc)


def poll(nr_ports: int, ports: list, rc: int, where: object = ("add", BUF, 24)) -> tuple:
    """struct sched_poll {ports; nr_ports; timeout} with the port list after it
    in the buffer (at buf + 24, word 6). A poll that would block is not
    portable: these end at once."""
    return sched(SCHEDOP_poll, [("q", where), nr_ports, 0, ("q", 0), *ports], rc)


SCHED_CASES: dict[str, list[tuple]] = {
    # common/sched/core.c SCHEDOP_shutdown_code: any reason is stored (the
    # case stores poweroff, what this guest ends with: the first code stays)
    "shutdown_code": [sched(SCHEDOP_shutdown_code, [SHUTDOWN_poweroff], 0),
                      ("hypercall", Hypercall.sched_op, SCHEDOP_shutdown_code, 0x1000, -EFAULT)],
    # do_poll: more than 128 ports; a list in Xen's range (guest_handle_okay);
    # a bad port; a pending port ends the poll at once
    "poll_checks": [
        poll(200, [], -EINVAL),
        poll(1, [], -EFAULT, where=HYPERVISOR_VIRT_START),
        poll(1, [BAD_PORT], -EINVAL),
        evtchn(EVTCHNOP_bind_ipi, [0, 0], 0),
        evtchn(EVTCHNOP_send, [("out", 4)], 0),
        poll(1, [("out", 0)], 0), close(("out", 24))],
    # SCHEDOP_remote_shutdown: rcu_lock_domain_by_id (no DOMID_SELF), then the
    # dummy XSM policy's XSM_DM_PRIV: a domU may not, itself included
    "remote_shutdown": [sched(SCHEDOP_remote_shutdown, [77, SHUTDOWN_poweroff], -ESRCH),
                        sched(SCHEDOP_remote_shutdown, [DOMID_SELF, SHUTDOWN_poweroff], -ESRCH),
                        sched(SCHEDOP_remote_shutdown, [OWN_DOMID, SHUTDOWN_poweroff], -EPERM)],
    # domain_watchdog: id 0 arms a free timer and returns its id + 1; timeout 0
    # disarms; an id above the two timers, or one not armed, -EINVAL
    "watchdog": [sched(SCHEDOP_watchdog, [0, 30], 1),
                 sched(SCHEDOP_watchdog, [1, 60], 0),
                 sched(SCHEDOP_watchdog, [2, 0], -EINVAL),
                 sched(SCHEDOP_watchdog, [3, 0], -EINVAL),
                 sched(SCHEDOP_watchdog, [1, 0], 0),
                 sched(SCHEDOP_watchdog, [1, 0], -EINVAL)],
    # SCHEDOP_pin_override: the hardware domain's alone, refused before the argument
    "pin_override": [("hypercall", Hypercall.sched_op, SCHEDOP_pin_override, 0x1000, -EPERM)],
}

CASES.update(SCHED_CASES)


def vcpu_op(cmd: int, vcpu: int, fields: list, rc: int) -> tuple:
    return struct(fields, Hypercall.vcpu_op, cmd, vcpu, BUF, rc)


VCPU_CASES: dict[str, list[tuple]] = {
    # common/domain.c default_initialise_vcpu: the context is copied first
    "vcpu_initialise_copies_first": [
        ("hypercall", Hypercall.vcpu_op, VCPUOP_initialise, 0, 0x1000, -EFAULT),
        ("hypercall", Hypercall.vcpu_op, VCPUOP_initialise, 0, ("add", "free_va", -8192),
         -EEXIST)],
    # common_vcpu_op VCPUOP_get_runstate_info: the caller is running
    "vcpu_runstate": [vcpu_op(VCPUOP_get_runstate_info, 0, [], 0),
                      word(0, RUNSTATE_running),
                      ("hypercall", Hypercall.vcpu_op, VCPUOP_get_runstate_info, 0, 0x1000,
                       -EFAULT)],
    # VCPUOP_set_periodic_timer: at least 1 ms; stop; back to Xen's 10 ms
    "vcpu_periodic_timer": [vcpu_op(VCPUOP_set_periodic_timer, 0, [("q", 999_999)], -EINVAL),
                            vcpu_op(VCPUOP_set_periodic_timer, 0, [("q", 1_000_000)], 0),
                            vcpu_op(VCPUOP_stop_periodic_timer, 0, [], 0),
                            ("hypercall", Hypercall.vcpu_op, VCPUOP_set_periodic_timer, 0,
                             0x1000, -EFAULT),
                            vcpu_op(VCPUOP_set_periodic_timer, 0, [("q", 10_000_000)], 0)],
    # VCPUOP_set_singleshot_timer of the caller (far ahead), then stopped; of
    # a vcpu that does not exist, -ENOENT
    "vcpu_singleshot_timer": [vcpu_op(VCPUOP_set_singleshot_timer, 0, [("q", 1 << 62), 0], 0),
                              vcpu_op(VCPUOP_stop_singleshot_timer, 0, [], 0),
                              vcpu_op(VCPUOP_set_singleshot_timer, 5, [("q", 1 << 62), 0],
                                      -ENOENT)],
    # arch/x86/domain.c do_vcpu_op VCPUOP_send_nmi: no argument
    "vcpu_send_nmi": [vcpu_op(VCPUOP_send_nmi, 0, [], -EINVAL)],
}

CASES.update(VCPU_CASES)
