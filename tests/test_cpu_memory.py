"""reuse_freed_memory: the large temporaries of a decode-like step reuse freed pages instead of faulting in fresh ones."""
import subprocess
import sys

PROBE = """
import resource, sys, torch
from lorax_server.cpu_memory import reuse_freed_memory

if sys.argv[1] == "tuned":
    assert reuse_freed_memory()

def step():
    logits = torch.ones(32, 49152)  # 6 MiB that lives through the step
    keys = [torch.ones(3, 320, 1024 + 64 * i) for i in range(8)]  # gathered K/V, a few MiB each
    return logits.log_softmax(-1).sum() + sum(k.sum() for k in keys)

for _ in range(5):  # the steady state a serving loop is in
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def page_faults_per_step(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    return int(out)


def test_decode_like_steps_stop_page_faulting():
    default = page_faults_per_step("default")  # glibc maps the big blocks afresh; how many faults varies by host
    tuned = page_faults_per_step("tuned")
    assert default > 200, "the probe no longer allocates enough to show the effect"
    assert tuned < default / 10
