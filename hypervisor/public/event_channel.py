"""event_channel_op commands and their argument structs
(xen/include/public/event_channel.h)."""

import ctypes

evtchn_port_t = ctypes.c_uint32

EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13


class evtchn_alloc_unbound(ctypes.LittleEndianStructure):
    """EVTCHNOP_alloc_unbound: a port for ``remote_dom`` to bind; 8 bytes."""
    _fields_ = [("dom", ctypes.c_uint16), ("remote_dom", ctypes.c_uint16),
                ("port", evtchn_port_t)]


class evtchn_bind_virq(ctypes.LittleEndianStructure):
    """EVTCHNOP_bind_virq: ``virq`` on ``vcpu``; the port comes back; 12 bytes."""
    _fields_ = [("virq", ctypes.c_uint32), ("vcpu", ctypes.c_uint32), ("port", evtchn_port_t)]


class evtchn_bind_ipi(ctypes.LittleEndianStructure):
    """EVTCHNOP_bind_ipi: an IPI port to ``vcpu``; the port comes back; 8 bytes."""
    _fields_ = [("vcpu", ctypes.c_uint32), ("port", evtchn_port_t)]


class evtchn_close(ctypes.LittleEndianStructure):
    """EVTCHNOP_close (also the layout of evtchn_send and evtchn_unmask); 4 bytes."""
    _fields_ = [("port", evtchn_port_t)]


class evtchn_send(evtchn_close):
    """EVTCHNOP_send; 4 bytes."""


class evtchn_unmask(evtchn_close):
    """EVTCHNOP_unmask; 4 bytes."""


class evtchn_bind_vcpu(ctypes.LittleEndianStructure):
    """EVTCHNOP_bind_vcpu: deliver ``port`` to ``vcpu``; 8 bytes."""
    _fields_ = [("port", evtchn_port_t), ("vcpu", ctypes.c_uint32)]


class evtchn_bind_interdomain(ctypes.LittleEndianStructure):
    """EVTCHNOP_bind_interdomain: bind to ``remote_port`` of ``remote_dom``; the
    local port comes back; 12 bytes."""
    _fields_ = [("remote_dom", ctypes.c_uint16), ("remote_port", evtchn_port_t),
                ("local_port", evtchn_port_t)]


EVTCHNSTAT_closed = 0      # free or reserved
EVTCHNSTAT_unbound = 1     # waiting for the remote domain to bind
EVTCHNSTAT_interdomain = 2
EVTCHNSTAT_pirq = 3
EVTCHNSTAT_virq = 4
EVTCHNSTAT_ipi = 5


class evtchn_status_interdomain(ctypes.LittleEndianStructure):
    _fields_ = [("dom", ctypes.c_uint16), ("port", evtchn_port_t)]


class evtchn_status_u(ctypes.Union):
    """The state-dependent part of evtchn_status: unbound.dom, interdomain,
    pirq, virq."""
    _fields_ = [("unbound_dom", ctypes.c_uint16), ("interdomain", evtchn_status_interdomain),
                ("pirq", ctypes.c_uint32), ("virq", ctypes.c_uint32)]


class evtchn_status(ctypes.LittleEndianStructure):
    """EVTCHNOP_status of ``port`` of ``dom``: its state and the vcpu it
    notifies; 24 bytes."""
    _fields_ = [("dom", ctypes.c_uint16), ("port", evtchn_port_t), ("status", ctypes.c_uint32),
                ("vcpu", ctypes.c_uint32), ("u", evtchn_status_u)]
