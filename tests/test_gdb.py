"""A real gdb (Debian's package) in batch mode against ``pvlab run --gdb 0``,
as a student debugs a user program: symbols and line information from the
program's ELF built with them (firmware/Makefile's debug target, the same
code byte for byte), a breakpoint in a function, a register and a variable
read, stepi and step, the VCPUs as threads, continue to the end."""

from __future__ import annotations

import subprocess

from tests.conftest import FIRMWARE
from tests.gdbclient import start_pvlab


def test_gdb_breaks_steps_and_continues_in_a_user_program(tmp_path):
    subprocess.run(["make", "-s", "-C", str(FIRMWARE), f"DEBUG={tmp_path}",
                    f"{tmp_path}/counter.elf"], check=True, capture_output=True, timeout=60)
    proc, port = start_pvlab(["run", "examples/debug.toml"])
    commands = [
        f"file {tmp_path}/counter.elf", f"target remote 127.0.0.1:{port}", "info threads",
        "break next_line", "continue", "print $rbx", "stepi", "x/i $pc", "step",
        "continue", "x/s &line", "info threads", "delete", "continue",
    ]
    args = ["gdb", "-batch", "-nx", "-ex", "set pagination off"]
    for c in commands:
        args += ["-ex", c]
    gdb = subprocess.run(args, capture_output=True, text=True, timeout=120)
    out, err = proc.communicate(timeout=120)
    log = gdb.stdout
    assert "* 1    Thread 1 (vcpu0 runnable)" in log and "  2    Thread 2 (vcpu1" in log
    assert "Breakpoint 1, next_line () at" in log and "counter.S:13" in log
    assert "$1 = 1" in log  # rbx: counter's first line
    assert "=> 0x400028 <next_line+3>:\tdec    %rcx" in log  # after stepi
    assert "15\t        jnz     3b" in log  # step: the next source line
    assert '0x402000:\t"counter 1\\n"' in log  # the line buffer, read through the pagetables
    assert "[Inferior 1 (Remote target) exited normally]" in log
    assert proc.returncode == 0, err
    assert "counter 3\n" in out and "hello from user space" in out
