"""keep_freed_memory: a network pass reuses the memory the previous one freed instead of faulting it in again."""

import subprocess
import sys
import textwrap

import pytest

from mmcs_monai.allocator import _glibc

# page faults of a CPnet forward pass (2 tiles of 224 px, float32: activations of 13-26 MB), before and after the call
SCRIPT = textwrap.dedent(
    """
    import resource
    import torch
    from mmcs_monai.allocator import keep_freed_memory
    from mmcs_monai.networks.cpnet import CPnet

    torch.set_num_threads(1)
    network, x = CPnet().eval(), torch.zeros(2, 2, 224, 224)

    def faults():
        with torch.no_grad():
            for _ in range(3):
                network(x)  # the first passes after a change may still grow the heap
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(3):
                network(x)
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3

    default = faults()
    applied = keep_freed_memory()
    print(int(applied), default, faults())
    """
)


@pytest.mark.skipif(_glibc() is None, reason="glibc only")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    applied, default, kept = (int(v) for v in out)
    assert applied == 1
    assert default > 5000  # glibc's defaults give the activations' pages back and fault them in again each pass
    assert kept < default / 10  # kept: the freed memory serves the next pass (at most one late heap growth seen)


def test_the_bundle_workflows_set_the_allocator_and_training_does_not():
    import json

    from helpers import REPO

    configs = {name: json.loads((REPO / "bundle" / "configs" / f"{name}.json").read_text()) for name in ("inference", "evaluate", "train")}
    call = "$mmcs_monai.allocator.keep_freed_memory()"
    assert call in configs["inference"]["initialize"]
    assert call in configs["evaluate"]["initialize"]
    assert call not in configs["train"]["initialize"]
