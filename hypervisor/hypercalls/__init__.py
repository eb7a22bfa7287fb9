"""The hypercall table: Xen's numbers mapped to their implementations.

One dispatcher (``Hypervisor.hypercall``) serves both the x86 ``syscall`` path
and the Python guest kernel; each implementation takes the calling VCPU and the
raw 64-bit arguments (rdi, rsi, rdx, r10, r8) and returns the value for rax. An
argument that points at a struct is read with the VCPU's copy_from_guest into
the ctypes struct hypervisor/public/ declares for it.
"""
