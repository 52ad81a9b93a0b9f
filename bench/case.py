"""Run benchmark cases in this process: ``python -m bench.case '<json>'`` prints one JSON line.

The JSON names the framework, the case (B, S, N, H, K, causal, mode), the contestants and the
repeats. Timing: one warm-up call each (compiles), then ``repeats`` rounds in which every
contestant runs once, in turn, so load from other processes hits all of them alike; the
median per contestant is reported. Memory (``"memory": true``): each contestant runs its
warm-up and timed calls on its own, one after another, and reports its peak resident set size
(VmHWM; getrusage ru_maxrss off Linux) after them minus its own baseline, the peak just before
its warm-up (its inputs already built). That peak is the process's high-water mark, so a
contestant's number counts only what it adds above the mark left by those before it:
``bench.run`` measures one contestant per process, which gives its true peak.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def _rss_mib():
    """Peak resident set size of this process image, MiB: VmHWM on Linux, else ru_maxrss.

    Linux carries ru_maxrss across exec from the process that forked this one, so a large parent
    (a test runner with both frameworks loaded) would hide this process's own peak; VmHWM starts
    afresh with the new image.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(spec):
    fw, threads = spec["framework"], spec.get("threads", 0)
    if fw == "torch":
        import torch

        if threads:
            torch.set_num_threads(threads)
        from bench import peers_torch as peers
    else:
        if threads == 1:
            os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        from bench import peers_jax as peers
    cfg, mode, causal = spec["case"], spec["case"]["mode"], spec["case"]["causal"]
    steps, result, base = {}, {}, {}
    memory, repeats = spec.get("memory", False), spec.get("repeats", 3)
    for impl in spec["impls"]:
        try:
            steps[impl] = peers.make(impl, cfg, mode, causal)
            base[impl] = _rss_mib()  # this contestant's own baseline
            t = time.perf_counter()
            steps[impl]()  # warm-up / compile
            result[impl] = {"warmup_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 (a contestant that cannot run is reported, not fatal)
            steps.pop(impl, None)
            result[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            continue
        if memory:  # its timed calls now, before the next contestant raises the high-water mark
            result[impl].update(_time({impl: steps[impl]}, repeats)[impl])
            result[impl]["peak_mib"] = _rss_mib() - base[impl]
    if not memory:
        for impl, timing in _time(steps, repeats).items():
            result[impl].update(timing)
    return result


def _time(steps, repeats):
    """``repeats`` rounds in which every step runs once, in turn: {impl: {median_s, times_s}}."""
    times = {impl: [] for impl in steps}
    for _ in range(repeats):
        for impl, step in steps.items():
            t = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t)
    return {impl: {"median_s": statistics.median(ts), "times_s": ts} for impl, ts in times.items()}


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
