"""Shared fixtures: booting domains from small configurations."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypervisor.toolstack.config import DomainConfig

ROOT = Path(__file__).resolve().parent.parent
FIRMWARE = ROOT / "firmware"
GUEST_IMAGE = FIRMWARE / "guest.elf"


def make_config(cmdline: str = "run=hello", vcpus: int = 1, memory: int = 16,
                seed: int = 1, name: str = "test") -> DomainConfig:
    return DomainConfig(name=name, memory=memory, vcpus=vcpus, image=GUEST_IMAGE,
                        cmdline=cmdline, seed=seed)


@pytest.fixture
def config_factory():
    return make_config
