"""Domain configuration: every bad key or value is named in one clear line."""

from __future__ import annotations

import pytest

from hypervisor.toolstack.config import ConfigError, load_config

GOOD = """
name = "t"
memory = 16
vcpus = 2
image = "{image}"
cmdline = "run=hello"
seed = 3
"""


def write(tmp_path, text, **fmt):
    p = tmp_path / "dom.toml"
    p.write_text(text.format(**fmt))
    return p


def test_good_config_loads(tmp_path):
    from tests.conftest import GUEST_IMAGE
    cfg = load_config(write(tmp_path, GOOD, image=GUEST_IMAGE))
    assert (cfg.name, cfg.memory, cfg.vcpus, cfg.cmdline, cfg.seed) == ("t", 16, 2, "run=hello", 3)
    assert cfg.sched_seed is None  # the schedule follows the seed
    cfg = load_config(write(tmp_path, GOOD.replace("seed = 3", "seed = 3\nsched_seed = 9"),
                            image=GUEST_IMAGE))
    assert (cfg.seed, cfg.sched_seed) == (3, 9)


def test_the_balloons_post_copy_policy_is_drop_unless_reconcile_is_asked(tmp_path):
    from tests.conftest import GUEST_IMAGE
    cfg = load_config(write(tmp_path, GOOD + "[balloon]\n", image=GUEST_IMAGE))
    assert cfg.balloon is not None and cfg.balloon.postcopy == "drop"
    cfg = load_config(write(tmp_path, GOOD + '[balloon]\npostcopy = "reconcile"\n',
                            image=GUEST_IMAGE))
    assert cfg.balloon is not None and cfg.balloon.postcopy == "reconcile"


def test_image_path_is_relative_to_the_config(tmp_path):
    from tests.conftest import GUEST_IMAGE
    (tmp_path / "img.elf").write_bytes(GUEST_IMAGE.read_bytes())
    cfg = load_config(write(tmp_path, GOOD, image="img.elf"))
    assert cfg.image == tmp_path / "img.elf"


@pytest.mark.parametrize("change, message", [
    (("memory = 16", "memory = 1"), "memory is 1 MiB"),
    (("memory = 16", 'memory = "16"'), "memory must be an integer"),
    (("vcpus = 2", "vcpus = 0"), "vcpus is 0"),
    (("vcpus = 2", "vcpus = 99"), "vcpus is 99"),
    (("seed = 3", "seed = -1"), "seed must not be negative"),
    (("seed = 3", "sead = 3"), "unknown key 'sead'"),
    (("seed = 3", "sched_seed = -2"), "sched_seed must not be negative"),
    (('name = "t"', ""), "missing key 'name'"),
    (("cmdline = \"run=hello\"", "cmdline = \"" + "x" * 2000 + "\""), "cmdline is longer"),
    (("seed = 3", 'seed = 3\n[balloon]\npostcopy = "queue"'),
     "balloon.postcopy must be \"drop\" or \"reconcile\", not 'queue'"),
])
def test_bad_values_are_named(tmp_path, change, message):
    from tests.conftest import GUEST_IMAGE
    text = GOOD.format(image=GUEST_IMAGE).replace(*change)
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text.replace("{", "{{").replace("}", "}}")))


def test_missing_image_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(write(tmp_path, GOOD, image="nowhere.elf"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "name = "))
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml")


def test_channels_in_xls_spelling(tmp_path):
    """xl's channel = ["name=..., connection=socket, path=..."], and pvlab's
    connection=file; relative paths are relative to the configuration."""
    from tests.conftest import GUEST_IMAGE
    cfg = load_config(write(tmp_path, GOOD + 'channel = ["name=org.pvlab.echo, '
                            'connection=socket, path=e.sock", "name=log,connection=file,'
                            'path=/tmp/x.log"]\n', image=GUEST_IMAGE))
    assert [(c.name, c.connection, c.path) for c in cfg.channels] == [
        ("org.pvlab.echo", "socket", str(tmp_path / "e.sock")), ("log", "file", "/tmp/x.log")]
    (state,) = cfg.device_states()
    assert state["kind"] == "console" and len(state["ports"]) == 2


@pytest.mark.parametrize("channel, message", [
    ('"name=a, connection=pty, path=p"', "connection 'pty' unknown"),
    ('"name=a, path=p"', "no connection"),
    ('"name=a, connection=socket, path=p, backend=dom0"', "'backend=dom0' is not one of"),
    ('"name=a, connection=file, path=p", "name=a, connection=file, path=q"',
     "two console ports named 'a'"),
    ("1", "channel must be a list of strings"),
    ('"name=vda, connection=file, path=p"', "'vda' is a device node of the guest's"),
    ('"name=icmp, connection=file, path=p"', "'icmp' is a device node of the guest's"),
    ('"name=vport0p3, connection=file, path=p"', "'vport0p3' is a device node"),
    (", ".join(f'"name=c{i}, connection=file, path=p{i}"' for i in range(6)),
     r"6 channels; the guest drives at most 5 \(ports 1 to 5\)"),
])
def test_bad_channels_are_named(tmp_path, channel, message):
    from tests.conftest import GUEST_IMAGE
    text = GOOD.format(image=GUEST_IMAGE) + f"channel = [{channel}]\n"
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text.replace("{", "{{").replace("}", "}}")))


def test_the_channels_allowed_are_the_ports_the_guest_drives():
    from guestos.drivers.virtio_console import MAX_PORTS
    from hypervisor.toolstack.config import MAX_CHANNELS
    assert MAX_CHANNELS == MAX_PORTS - 1   # port 0 is never a channel


def test_the_image_check_refuses_a_port_named_as_another_drivers_node():
    from hypervisor.devices.console import check_ports
    for taken in ("vdb", "icmp", "vport0p1"):
        assert "reserved" in check_ports([{"name": taken, "connection": "file", "path": "p"}])
    assert check_ports([{"name": "vdab", "connection": "file", "path": "p"}]) is None
