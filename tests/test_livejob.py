"""The daemon's live jobs' two mechanisms (livejob.py), alone: the machine
passed between the daemon's loop and a job's thread, and a job's wire,
which gives the machine back for every call that may wait."""

from __future__ import annotations

import io
import threading

import pytest

from hypervisor.toolstack.livejob import WIRE_CHUNK, Machine, Unheld


class Recorder:
    """A machine that records when it is given back and taken again."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def give(self) -> None:
        self.log.append("give")

    def take(self) -> None:
        self.log.append("take")


class Wire(io.BytesIO):
    """A file whose every call notes whether the machine was held."""

    def __init__(self, machine: Recorder, data: bytes = b"") -> None:
        super().__init__(data)
        self.machine = machine

    def _note(self, what: str) -> None:
        held = not self.machine.log or self.machine.log[-1] == "take"
        self.machine.log.append(f"{what}{' HELD' if held else ''}")

    def read(self, n: int = -1) -> bytes:
        self._note("read")
        return super().read(n)

    def read1(self, n: int = -1) -> bytes:
        self._note("read1")
        return super().read1(n)

    def readline(self, limit: int = -1) -> bytes:
        self._note("readline")
        return super().readline(limit)

    def write(self, data) -> int:
        self._note("write")
        return super().write(data)


@pytest.mark.parametrize("call", ["read", "read1", "readline"])
def test_every_read_gives_the_machine_back(call):
    """read1 too: the migration's receiver reads with read1 where it can
    (a read1 passed through with the machine held stopped the daemon while
    it waited for the sender)."""
    m = Recorder()
    wire = Unheld(Wire(m, b"abc\n"), m)  # type: ignore[arg-type]
    assert getattr(wire, call)(4) == b"abc\n"
    assert m.log == ["give", call, "take"]


def test_writes_are_gathered_and_sent_unheld():
    m = Recorder()
    f = Wire(m)
    wire = Unheld(f, m)  # type: ignore[arg-type]
    wire.write(b"x" * 10)
    assert m.log == [] and f.getvalue() == b""  # gathered
    wire.write(b"y" * WIRE_CHUNK)                # a batch: sent
    assert m.log == ["give", "write", "take"] and len(f.getvalue()) == 10 + WIRE_CHUNK
    wire.write(b"z")
    wire.read(0)                                 # a read sends what is gathered first
    assert m.log[3:] == ["give", "write", "take", "give", "read", "take"]
    with pytest.raises(AttributeError, match="would wait"):
        wire.peek  # noqa: B018


def test_the_loop_hands_the_machine_to_a_job_between_turns():
    """A job takes the machine at the loop's turn, gives it back for one
    turn (let_run), and the loop never runs while the job holds it."""
    woken: list[int] = []
    m = Machine(lambda: woken.append(1))
    holder: list[str] = []
    done = threading.Event()

    def job() -> None:
        m.take()
        holder.append("job")
        m.let_run()           # the loop takes one turn meanwhile
        holder.append("job again")
        m.give()
        done.set()
    t = threading.Thread(target=job)
    t.start()
    turns = 0
    while not done.is_set():
        holder.append("loop")
        m.turn()
        turns += 1
        assert turns < 10_000, "the job never got the machine"
    t.join()
    assert woken  # the job's ask ended the loop's poll
    first = holder.index("job")
    # exactly one turn of the loop between the job's two holds
    assert holder[first + 1:first + 3] == ["loop", "job again"]
