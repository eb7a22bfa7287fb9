"""Machine memory and Xen's paravirtual memory management: frames, the frame
table, the M2P, the page-type system and the MMU hypercalls."""
