"""Lab stopmachine: multi_cpu_stop's states, each acknowledged by every cpu,
with the save's xen_suspend on vcpu0 while the others spin with events
masked; graded under a hundred schedules."""

from labs.lab import Lab

LAB = Lab(
    name="stopmachine",
    order=4,
    title="stop_machine: every cpu through every state, the save on vcpu0",
    handout="docs/labs/stopmachine.md",
    todo={"guestos.stop_machine": {
        "_ack": (
            "This cpu acknowledges the state sm.state: one acknowledgement fewer "
            "missing (sm.ack). Only the cpu whose acknowledgement was the last one "
            "missing moves the state on: it makes every cpu's acknowledgement "
            "missing again (sm.nthreads of them) and advances sm.state by one. "
            "The last acknowledgement of EXIT ends the stop_machine instead: "
            "sm.active = 0, sm.state = NONE. (The reference also plants a race "
            "here when sm.bug_ack is set; yours need not.)"),
        "multi_cpu_stop": (
            "One turn of this cpu's spin. The state is sm.state while sm.active, "
            "else NONE. A cpu that acknowledged EXIT leaves (_leave). When the "
            "state is one this cpu has not seen yet (pc.stop_state), the cpu "
            "records it there, marks it for the trace that pvlab plot timeline "
            "draws (cpu.trace_marker(f\"stop_machine {STATE_NAMES[cur]}\")), does "
            "the state's work and only then acknowledges "
            "it (_ack): in DISABLE_IRQ it saves its event mask (upcall_masked) "
            "in pc.stop_saved_mask and masks its events (set_upcall_mask); in "
            "RUN the cpu sm.cpu, and no other, calls fn = symbol(sm.fn): an int "
            "result goes to sm.result; a TailCall means fn blocked, and is "
            "returned unacknowledged (fn's continuation calls fn_done). After "
            "acknowledging EXIT the cpu leaves. Otherwise it spins on: a "
            "SCHEDOP_yield whose continuation is multi_cpu_stop."),
        "fn_done": (
            "fn blocked and its continuation has its result, on cpu sm.cpu in "
            "RUN: keep the result, spin from an empty stack again "
            "(percpu(cpu).stack_top, as enter does), acknowledge RUN and spin on "
            "as multi_cpu_stop does."),
        "_leave": (
            "This cpu acknowledged EXIT. It is out of the stopper (in_stopper "
            "0, stop_state NONE), its event mask is the one it saved in "
            "DISABLE_IRQ, and it goes back to work: the cpu that asked "
            "(sm.caller) goes on with then = symbol(sm.then), every other one "
            "with schedule."),
    }},
    tests="labs.stopmachine.grade",
)
