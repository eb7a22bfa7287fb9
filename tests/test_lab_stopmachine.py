"""The stopmachine lab's grader fails a plausible stop_machine with a race in
it: a student's starting point, written with the acknowledgement count off by
one, passes the single schedule it is first tried on and fails under the
schedules the grader explores, naming the schedule and the run that replays
it; the replay shows the race again."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import checkout_env

# A student's four functions (the bodies the starting point leaves out), with
# one mistake: a state moves on when one acknowledgement is still missing.
RACY = {
    "_ack": """
    sm = stopper(cpu)
    sm.ack = sm.ack - 1
    if sm.state == EXIT and sm.ack == 0:
        sm.active, sm.state = 0, NONE
    elif sm.state != EXIT and sm.ack <= 1:  # "the last one is on its way": it is not
        sm.ack, sm.state = sm.nthreads, sm.state + 1
""",
    "multi_cpu_stop": """
    sm = stopper(cpu)
    pc = cpu_stopper(cpu)
    cur = sm.state if sm.active else NONE
    if pc.stop_state == EXIT:
        return _leave(cpu)
    if cur != pc.stop_state and cur != NONE:
        pc.stop_state = cur
        if cur == DISABLE_IRQ:
            pc.stop_saved_mask = upcall_masked(cpu)
            set_upcall_mask(cpu, 1)
        elif cur == RUN and cpu.vcpu_id == sm.cpu:
            result = symbol(sm.fn)(cpu)
            if isinstance(result, TailCall):
                return result
            sm.result = result
        _ack(cpu)
        if cur == EXIT:
            return _leave(cpu)
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), multi_cpu_stop)
""",
    "fn_done": """
    stopper(cpu).result = result
    cpu.set_regs(rsp=percpu(cpu).stack_top)
    _ack(cpu)
    return TailCall(Hypercall.sched_op, (SCHEDOP_yield, 0), multi_cpu_stop)
""",
    "_leave": """
    pc = cpu_stopper(cpu)
    sm = stopper(cpu)
    pc.in_stopper, pc.stop_state = 0, NONE
    set_upcall_mask(cpu, pc.stop_saved_mask)
    return symbol(sm.then)(cpu) if sm.caller == cpu.vcpu_id else schedule(cpu)
""",
}


# Another student's: RUN is acknowledged on sight, before fn is called, and
# fn_done does not acknowledge it again; so the others may leave while fn is
# blocked in the suspend hypercall.
EARLY_LEAVE = dict(RACY, _ack=RACY["_ack"].replace(
    "sm.ack <= 1:  # \"the last one is on its way\": it is not", "sm.ack == 0:"))
EARLY_LEAVE["multi_cpu_stop"] = RACY["multi_cpu_stop"].replace(
    "        if cur == DISABLE_IRQ:", "        _ack(cpu)\n        if cur == DISABLE_IRQ:").replace(
    "            sm.result = result\n        _ack(cpu)\n", "            sm.result = result\n")
EARLY_LEAVE["fn_done"] = RACY["fn_done"].replace("    _ack(cpu)\n", "")


def pvlab(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hypervisor.toolstack.cli", *args],
                          cwd=cwd, capture_output=True, text=True, env=checkout_env(),
                          timeout=600)


def write_functions(path: Path, bodies: dict[str, str]) -> None:
    """Put each body where the starting point has its rule and its raise."""
    text = path.read_text()
    for name, body in bodies.items():
        stub = re.compile(r"(?:    #.*\n)+    raise NotImplementedError\(\"lab stopmachine: "
                          + re.escape(name) + r"\"\)\n")
        text, n = stub.subn(lambda _m, b=body: b.lstrip("\n"), text)
        assert n == 1, name
    path.write_text(text)


def test_an_acknowledgement_count_off_by_one_passes_one_schedule_and_fails_another(tmp_path):
    assert pvlab("lab", "start", "stopmachine", cwd=tmp_path).returncode == 0
    write_functions(tmp_path / "stopmachine" / "stop_machine.py", RACY)
    r = pvlab("lab", "grade", "stopmachine", "--test", "many_schedules", "--seed", "3",
              "--json", "grade.json", cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    tests = {t["name"]: t for t in json.loads((tmp_path / "grade.json").read_text())["tests"]}
    assert tests["suspend_on_cpu0"]["earned"] == 15   # its one schedule hides the race
    message = tests["many_schedules"]["message"]
    assert tests["many_schedules"]["earned"] == 0
    assert "1 of 1 schedules went wrong (seeds 3). Schedule 3:" in message
    assert "seed 3; replay: pvlab lab grade stopmachine --test many_schedules --seed 3" in message
    run = next(x for x in message.splitlines() if x.startswith("the run:  "))
    cmd = shlex.split(run.removeprefix("the run:  "))
    assert cmd[:4] == ["pvlab", "lab", "run", "stopmachine"] and "--sched-seed" in cmd
    again = pvlab(*cmd[1:], cwd=tmp_path)
    assert "FAILURE" in again.stdout or "still running" in again.stderr, again.stdout


def test_cpus_that_leave_while_fn_is_blocked_are_named(tmp_path):
    """xen_suspend's continuation reports cpus that left the stopper before it
    was done, and the grader says what that means (before, schedule 2 of this
    stop_machine was only "stranded", the guest still running at the limit)."""
    assert pvlab("lab", "start", "stopmachine", cwd=tmp_path).returncode == 0
    write_functions(tmp_path / "stopmachine" / "stop_machine.py", EARLY_LEAVE)
    r = pvlab("lab", "grade", "stopmachine", "--test", "many_schedules", "--seed", "2",
              cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cpus left the stopper while xen_suspend was still running" in r.stdout, r.stdout
    assert "post-suspend: FAILURE: cpus [1, 2] left the stopper" in r.stdout
