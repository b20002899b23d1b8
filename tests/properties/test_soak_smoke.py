"""A tiny soak run as part of the normal suite, and what the soak found, reduced to minimal nights.

``make soak`` runs the full soak (tests/soak.py); this keeps its generator, driver and invariant
checks working on every ``make test``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fronts import FAST, commands, records
from tests.sim.node import FakeNode
from tests.sim.vzdump import INPROCESS, run_job
from tools.soak import run_soak

SMOKE_JOBS = 20
SMOKE_SEED = 20240501
SMOKE_WORKERS = 4  # most of a job is waiting on fake qm/pct processes


def test_soak_smoke() -> None:
    lines: list[str] = []
    summary = run_soak(
        SMOKE_JOBS, SMOKE_SEED, max_seconds=300, workers=SMOKE_WORKERS, say=lines.append
    )
    print(summary.line())
    assert summary.complete and summary.jobs >= SMOKE_JOBS
    assert summary.backed_up > 0 and summary.holders_stopped > 0  # it did exercise the hook
    assert summary.violations == [], "\n".join(lines)


# ---- findings of the soak --------------------------------------------------------------------

TWO_GPUS_MAPPED = """\
gpu
\tmap node=pve1,path=0000:01:00.0,id=10de:2204,iommugroup=30
\tmap node=pve1,path=0000:02:00.0,id=10de:2204,iommugroup=31
"""


def two_gpu_node(root: Path, *, mdev: bool = False) -> FakeNode:
    """GPU 01:00 (audio) and GPU 02:00, groups 30 and 31; one mapping over both. ``mdev``: both
    are mdev parents, and the mapping is marked ``mdev 1``, as PVE requires of it then. Such a
    mapping is valid only while no device of it is bound to vfio-pci (docs/pve-facts.md §5)."""
    node = FakeNode(root)
    types = ("nvidia-35",) if mdev else ()
    node.add_gpu(
        "0000:01:00",
        group=30,
        functions=("0", "1"),
        nvidia_minor=0,
        drm=("renderD128",),
        mdev_types=types,
    )
    node.add_gpu("0000:02:00", group=31, nvidia_minor=1, drm=("renderD129",), mdev_types=types)
    mapping = TWO_GPUS_MAPPED.replace("gpu\n", "gpu\n\tmdev 1\n", 1) if mdev else TWO_GPUS_MAPPED
    node.set_mapping(mapping)
    node.write_override(FAST)
    return node


@pytest.mark.parametrize("user", ["ct-device-node", "mdev", "audio-function", "raw-args"])
def test_mapped_vm_whose_first_alternative_is_used_unreserved(tmp_path: Path, user: str) -> None:
    node = two_gpu_node(tmp_path, mdev=user == "mdev")
    if user == "ct-device-node":
        node.add_ct(200, dev=["/dev/dri/renderD128"], running=True)
    elif user == "mdev":
        node.add_vm(200, hostpci=["01:00.0,mdev=nvidia-35"], running=True)
    elif user == "audio-function":
        node.add_vm(200, hostpci=["01:00.1"], running=True)  # reserves 01:00.1 only
    else:  # PVE reserves nothing for a raw "args: -device vfio-pci" (soak seed 1795830302)
        node.add_vm(200, args="-device vfio-pci,host=0000:01:00.0,id=raw0", running=True)
    node.add_vm(120, hostpci=["mapping=gpu"])
    job = run_job(node, [120], hook_cmd=INPROCESS)
    assert job.guests[120].ok, job.guests[120].error  # not QEMU's "Device or resource busy"
    assert node.running_guests() == {200}


def test_restart_lets_a_mapped_guest_take_another_holders_gpu(tmp_path: Path) -> None:
    node = two_gpu_node(tmp_path)
    node.add_vm(129, hostpci=["01:00.0"], running=True)
    node.add_vm(125, hostpci=["mapping=gpu"], running=True)  # 01:00.0 is taken: gets 02:00.0
    node.add_vm(121, hostpci=["01:00", "02:00"])  # its backup needs both GPUs
    job = run_job(node, [121], hook_cmd=INPROCESS)
    assert sorted(c[2] for c in commands(node, "shutdown")) == ["125", "129"]
    assert job.ok, job.log  # fails: 125 restarts first on 01:00.0, 129 cannot start
    assert node.running_guests() == {125, 129}
    assert records(node) == []
