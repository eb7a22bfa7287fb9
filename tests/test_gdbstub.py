"""The gdb server (hypervisor/toolstack/gdbsx.py) and its packet layer
(rsp.py), spoken to over a socket as gdb speaks, without gdb."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET

import pytest

from hypervisor.public.gdb import GDB_REGS
from hypervisor.toolstack.cli import main
from hypervisor.toolstack.gdbsx import decode_registers, encode_registers, target_xml
from hypervisor.toolstack.rsp import Connection, checksum, escape, frame, unescape
from hypervisor.toolstack.session import save_domain
from tests.conftest import ROOT, make_config
from tests.gdbclient import GdbClient

NEXT_LINE = 0x400025  # counter's loop head
LINE_BUF = 0x402000   # counter's line buffer (.bss)
RIP = [r.name for r in GDB_REGS].index("rip")


# --- packets ----------------------------------------------------------------------------

def test_frame_checksum_and_escapes():
    assert frame(b"OK") == b"$OK#9a"
    assert checksum(b"qSupported") == 0x37
    raw = b"a$b#c}d*e"
    assert escape(raw) == b"a}\x04b}\x03c}]d}\ne"
    assert unescape(escape(raw)) == raw


def test_connection_acks_resends_and_sees_interrupts():
    ours, gdb = socket.socketpair()
    conn = Connection(ours)
    gdb.sendall(b"+$g#00" + frame(b"g") + b"\x03")
    assert conn.read_packet() == b"g"
    assert gdb.recv(16) == b"-+"  # the damaged copy refused, the good one taken
    assert conn.poll_interrupt() and not conn.poll_interrupt()
    conn.send(b"OK")
    gdb.sendall(b"-")  # gdb did not get it: sent again
    gdb.sendall(frame(b"?"))
    assert conn.read_packet() == b"?"
    assert gdb.recv(64) == b"$OK#9a$OK#9a+"
    conn.acks = False
    gdb.sendall(frame(b"c"))
    assert conn.read_packet() == b"c"
    gdb.setblocking(False)
    with pytest.raises(BlockingIOError):
        gdb.recv(16)  # no acknowledgement any more
    conn.close()


def test_target_xml_lists_every_register_in_packet_order():
    root = ET.fromstring(target_xml())
    assert root.findtext("architecture") == "i386:x86-64"
    regs = root.iter("reg")
    assert [(r.get("name"), int(r.get("regnum"))) for r in regs] == \
        [(r.name, i) for i, r in enumerate(GDB_REGS)]
    values = {r.name: (1 << r.bits) - 1 - i for i, r in enumerate(GDB_REGS)}
    packet = encode_registers(values)
    assert len(packet) == sum(r.bits for r in GDB_REGS) // 4
    assert decode_registers(packet) == values


# --- a session --------------------------------------------------------------------------

def test_a_session_breakpoint_registers_memory_step_detach():
    gdb = GdbClient(["run", "examples/debug.toml"])  # counter and hello
    assert b"qXfer:features:read+" in gdb.ask(b"qSupported:multiprocess+;xmlRegisters=i386")
    doc, off = b"", 0
    while True:  # target.xml in small pieces, as gdb may ask for it
        part = gdb.ask(b"qXfer:features:read:target.xml:%x,100" % off)
        doc, off = doc + part[1:], off + len(part) - 1
        if part[:1] == b"l":
            break
    assert doc == target_xml()
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert gdb.ask(b"qfThreadInfo") == b"m1,2"
    assert gdb.ask(b"qsThreadInfo") == b"l"
    assert gdb.ask(b"m1000,8") == b"E14"  # nothing is mapped there
    assert gdb.ask(b"mzz,8") == b"E01" and gdb.ask(b"P10") == b"E01"  # malformed: no traceback
    assert gdb.ask(b"Z2,402000,8") == b""  # no watchpoints
    assert gdb.ask(b"X402000,0:") == b""   # binary writes unknown: gdb falls back to M
    assert gdb.ask(b"Z0,%x,1" % NEXT_LINE) == b"OK"
    gdb.send(b"vCont;c")
    stop = gdb.reply()
    assert stop.startswith(b"T05thread:")
    assert gdb.ask(b"Hg" + stop[10:-1]) == b"OK"
    regs = decode_registers(gdb.ask(b"g"))
    assert regs["rip"] == NEXT_LINE and regs["rbx"] == 1  # counter's first line
    assert gdb.ask(b"p%x" % RIP) == NEXT_LINE.to_bytes(8, "little").hex().encode()
    assert gdb.ask(b"m%x,3" % NEXT_LINE) == b"4c89e9"  # mov %r13,%rcx: no int3 in memory
    assert gdb.ask(b"M%x,4:70766c62" % LINE_BUF) == b"OK"
    assert gdb.ask(b"m%x,4" % LINE_BUF) == b"70766c62"
    assert gdb.ask(b"z0,%x,1" % NEXT_LINE) == b"OK"
    gdb.send(b"vCont;s:%s;c" % stop[10:-1])
    assert gdb.reply() == stop
    assert decode_registers(gdb.ask(b"g"))["rip"] == NEXT_LINE + 3
    assert gdb.ask(b"D") == b"OK"
    code, out, err = gdb.finish()
    assert code == 0, err
    assert "counter 3" in out  # the guest ran on to its end


def test_ctrl_c_stops_the_running_guest_and_k_kills_it():
    gdb = GdbClient(["run", "examples/smp.toml"])
    assert gdb.ask(b"?") == b"T05thread:1;"
    gdb.send(b"c")
    gdb.sock.sendall(b"\x03")
    assert gdb.reply().startswith(b"T02thread:")
    gdb.sock.sendall(frame(b"k"))
    code, _, err = gdb.finish()
    assert code == 1
    assert err.strip().endswith("pvlab: the domain was killed from gdb")


def test_gdb_is_told_when_the_domain_ends():
    gdb = GdbClient(["run", "examples/hello.toml"])
    assert gdb.ask(b"QStartNoAckMode") == b"OK"
    gdb.sock.sendall(frame(b"c"))  # no acknowledgements any more
    assert gdb.reply() == b"W00"  # it powered off
    code, out, _ = gdb.finish()
    assert code == 0 and "hello from user space" in out


def test_bad_gdb_options_are_one_line(capsys):
    hello = str(ROOT / "examples/hello.toml")
    with pytest.raises(SystemExit) as e:
        main(["run", hello, "--gdb", "70000"])
    assert e.value.code == 2
    assert "'70000' is no TCP port" in capsys.readouterr().err.splitlines()[-1]
    assert main(["run", hello, "--gdb", "0", "--fast"]) == 2
    assert capsys.readouterr().err.startswith("pvlab: --gdb needs the deterministic clock: "
                                              "leave out --fast")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["run", hello, "--gdb", str(port)]) == 2
    assert capsys.readouterr().err.startswith(f"pvlab: cannot listen on 127.0.0.1:{port}: ")


def test_restore_waits_for_gdb_too(booted, tmp_path):
    hv, dom = booted(make_config("run=counter:6:300000"))
    save_domain(hv, dom, str(tmp_path / "c.img"), at_ns=3_000_000)
    gdb = GdbClient(["restore", str(tmp_path / "c.img")])
    assert gdb.ask(b"?") == b"T05thread:1;"
    assert gdb.ask(b"Z0,%x,1" % NEXT_LINE) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"T05thread:1;"
    assert decode_registers(gdb.ask(b"g"))["rbx"] == 6  # its last line, after the restore
    assert gdb.ask(b"z0,%x,1" % NEXT_LINE) == b"OK"
    gdb.send(b"c")
    assert gdb.reply() == b"W00"
    code, out, _ = gdb.finish()
    assert code == 0 and "counter 6\n" in out
