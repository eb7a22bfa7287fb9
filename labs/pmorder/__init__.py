"""Lab pmorder: the order of the suspend path (Linux's
drivers/base/power/main.c and drivers/xen/manage.c): every device frozen,
last-registered first, then frozen again with no interrupts, syscore, the
suspend hypercall, and back by THAW when it returns 1 or RESTORE when it
returns 0; a device that fails a freeze makes the PM core undo what that
phase did and the suspend is aborted."""

from labs.lab import Lab

LAB = Lab(
    name="pmorder",
    order=3,
    title="The suspend path's order: FREEZE, noirq, the hypercall, THAW or RESTORE",
    handout="docs/labs/pmorder.md",
    todo={
        "guestos.pm": {
            "_suspend": (
                "Print `PM: {what}(FREEZE)`, then call `phase` of each device with "
                "`_call(cpu, i, phase)`, the last registered first (i from nr_devices - 1 "
                "down to 0): a device is frozen only after every device registered after it. "
                "A non-zero rc is a failure: print `PM: device {dev_name(cpu, i)} failed to "
                "{PHASES[phase]}: error {rc}`, give `undo` to the devices this phase has "
                "already done, the one done last first (the failing one is not among them), "
                "and return rc. Return 0 when every device succeeded."),
            "_resume": (
                "Print `PM: {what}({PMSG_NAMES[msg]})`, then call `phase` of each device "
                "with `_call`, in registration order (the reverse of the freeze). A device "
                "that fails is reported as in _suspend and the others still run: a resume "
                "is not undone."),
            "dpm_resume_noirq": (
                "The noirq callback msg asks for: thaw_noirq after PMSG_THAW (the guest goes "
                "on in the domain it was in), restore_noirq after PMSG_RESTORE (a new "
                "domain). Its log line names it `dpm_resume_noirq`."),
            "dpm_resume_end": (
                "As dpm_resume_noirq, with the callbacks thaw or restore; its log line names "
                "it `dpm_resume_end`."),
        },
        "guestos.manage": {
            "suspend_devices": (
                "The steps, in order: the devices' freeze (pm.dpm_suspend_start), the "
                "store's suspend (_xs_suspend), the devices' freeze_noirq "
                "(pm.dpm_suspend_noirq), then print `suspend: stop_machine(xen_suspend) on "
                "cpu0` and start stop_machine(cpu, xen_suspend, suspend_resume); once it is "
                "started (0), `return enter(cpu)` joins it. If a step fails, print `suspend: "
                "dpm_suspend_start failed; aborted` (or dpm_suspend_noirq, or `suspend: "
                "stop_machine is busy; aborted`), undo the steps done before it, the latest "
                "first (a failed PM phase has already undone its own devices; the store's "
                "undo is _xs_suspend_cancel, the freeze's is a THAW), then "
                "freezer.thaw_processes(cpu) and return _worker_done(cpu): the suspend is "
                "aborted and the guest goes on."),
            "suspend_resume": (
                "suspend_state(cpu).cancelled is the suspend hypercall's result: 1 the "
                "suspend was cancelled or only a checkpoint (PMSG_THAW), 0 the guest runs in "
                "a new domain after a restore (PMSG_RESTORE). In order: the devices' noirq "
                "resume; the store (_xs_suspend_cancel after a cancel, _xs_resume in a new "
                "domain, whose ring and watches are new); the devices' resume; "
                "freezer.thaw_processes(cpu); print `suspend: done`; return "
                "_worker_done(cpu)."),
        },
    },
    tests="labs.pmorder.grade",
)
