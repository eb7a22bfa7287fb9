"""pvlab's public ABI: what Xen keeps in xen/include/public/.

Hypercall numbers, struct layouts, errno values and constants, each declared
once with Xen's names and values. The guest kernel (guestos) may import this
package and nothing else of the hypervisor.
"""
