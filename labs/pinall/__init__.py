"""Lab pinall: the pgd_list, and pinning every pgd on it for a save."""

from labs.lab import Lab

LAB = Lab(
    name="pinall",
    order=1,
    title="Pin every pagetable before a save, unpin after",
    handout="docs/labs/pinall.md",
    todo={"guestos.pgd": {
        "pgd_list": (
            "The pgd_list lives in kernel data: MAX_TASKS slots of 8 bytes from "
            "AREAS[\"pgd_list\"].va(cpu), each the pfn of a pgd, or 0 for an empty slot "
            "(pfn 0 is never a pgd). Return the pfns of the slots that are not empty, "
            "in slot order. Read with cpu.read_u64 (or cpu.read and int.from_bytes)."),
        "pgd_list_add": (
            "Write pfn into the first empty (0) slot of the pgd_list area "
            "(cpu.write_u64). No empty slot left is a kernel bug: raise "
            "KernelPanic(\"pgd_list is full\")."),
        "pgd_list_del": (
            "Write 0 into the slot that holds pfn, so that the list forgets a freed "
            "pgd. A pgd that is not on the list is a kernel bug: raise KernelPanic "
            "naming it."),
        "xen_mm_pin_all": (
            "Linux's xen_mm_pin_all (arch/x86/xen/mmu_pv.c): for every pgd on the "
            "pgd_list that is not pinned (pgd_pinned), pin it with pgd_pin and mark it "
            "with set_page_flags(cpu, pgd, set_=PG_SAVEPINNED), so that the resume knows "
            "which pgds the save pinned. Leave pinned pgds alone: Xen refuses to pin a "
            "table that is pinned already. Return how many pgds you pinned."),
        "xen_mm_unpin_all": (
            "Linux's xen_mm_unpin_all: for every pgd on the pgd_list marked "
            "PG_SAVEPINNED (page_flags), unpin it with pgd_unpin, which clears "
            "PG_PINNED and PG_SAVEPINNED. Leave every other pgd pinned: its task runs, "
            "and unpins it itself at its exit. Return how many pgds you unpinned."),
    }},
    tests="labs.pinall.grade",
)
