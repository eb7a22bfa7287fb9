"""Lab canonicalise: pagetables travel as pfns. The save rewrites every
present entry's machine frame into the guest's pfn (Xen's
normalise_pagetable), the restore rewrites each pfn into the new machine's
frame (x86_pv_localise_page), both with numpy over whole tables, and both
refuse an entry that names a frame the guest does not own."""

from labs.lab import Lab

LAB = Lab(
    name="canonicalise",
    order=2,
    title="Canonicalise pagetables at the save, localise them at the restore",
    handout="docs/labs/canonicalise.md",
    todo={
        "hypervisor.toolstack.save": {
            "canonicalise":
                "Return a copy of tables (never change the guest's pages) in canonical form. "
                "In every L4, slots ROOT_PAGETABLE_FIRST_XEN_SLOT..LAST (256..271) become 0: "
                "they are the hypervisor's, which fills them again. Every present entry "
                "(_PAGE_PRESENT) of an L2..L4 with _PAGE_PSE set is a superpage: SaveError "
                "'cannot migrate a superpage: ...'. Every other present entry holds an mfn "
                "in bits 12..51 (PTE_FRAME_MASK); it must be the domain's, as Xen's "
                "mfn_in_pseudophysmap says: mfn < m2p.size, pfn = m2p[mfn] < p2m.size and "
                "p2m[pfn] == mfn. If it is, bits 12..51 become the pfn and every other bit "
                "stays; if not, SaveError 'pagetable pfn P (Ln) slot S: entry E holds mfn "
                "M, which is not the domain's (bad mfn for Ln[S])', P the table's pfn "
                "(table_pfns). Non-present entries are copied as they are. Work on all "
                "tables at once with numpy masks, not entry by entry.",
            "_mfn_to_pfn":
                "The pfn the M2P (domctl.map_m2p(hv)) gives for mfn, checked as "
                "canonicalise checks an entry: mfn inside the M2P, its pfn inside the p2m, "
                "p2m[pfn] == mfn; otherwise SaveError 'bad mfn for WHAT: M is not in the "
                "domain's pseudophysical map'.",
        },
        "hypervisor.toolstack.restore": {
            "localise_page":
                "The mirror of save.canonicalise. Return a copy of tables in which every "
                "present entry's bits 12..51, a pfn, become p2m[pfn], every other bit "
                "kept; non-present entries are copied as they are. A present entry whose "
                "pfn is beyond the p2m (pfn >= p2m.size), or whose p2m entry is "
                "INVALID_MFN, has no frame here: RestoreError 'pagetable pfn P (Ln) slot "
                "S: entry E names pfn F, which has no frame (bad mfn for Ln[S])', P the "
                "table's pfn (table_pfns). Never index the p2m with an unchecked pfn, "
                "never shift INVALID_MFN into an entry. numpy over all tables at once.",
        },
    },
    tests="labs.canonicalise.grade",
)
