"""callback_op (xen/include/public/callback.h)."""

CALLBACKOP_register = 0
CALLBACKOP_unregister = 1

CALLBACKTYPE_event = 0
CALLBACKTYPE_failsafe = 1
CALLBACKTYPE_syscall = 2
CALLBACKTYPE_nmi = 4
CALLBACKTYPE_sysenter = 5
CALLBACKTYPE_syscall32 = 7

_CALLBACKF_mask_events = 0
CALLBACKF_mask_events = 1 << _CALLBACKF_mask_events
