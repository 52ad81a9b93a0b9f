"""Run benchmark cases in this process: ``python -m bench.case '<json>'`` prints one JSON line.

The JSON names the framework, the case (B, S, N, H, K, causal, mode), the contestants and the
repeats. Timing: one warm-up call each (compiles), then ``repeats`` rounds in which every
contestant runs once, in turn, so load from other processes hits all of them alike; the
median per contestant is reported. Memory (``"memory": true``, one contestant): the peak
resident set size (getrusage ru_maxrss) after one warm-up and one timed call, minus the peak
before the first call (inputs already built), in a process that ran nothing else.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def _rss_mib():
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
    steps, result = {}, {}
    base = _rss_mib()
    for impl in spec["impls"]:
        try:
            steps[impl] = peers.make(impl, cfg, mode, causal)
            base = _rss_mib()
            t = time.perf_counter()
            steps[impl]()  # warm-up / compile
            result[impl] = {"warmup_s": time.perf_counter() - t}
        except Exception as e:  # noqa: BLE001 (a contestant that cannot run is reported, not fatal)
            steps.pop(impl, None)
            result[impl] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    times = {impl: [] for impl in steps}
    for _ in range(spec.get("repeats", 3)):
        for impl, step in steps.items():
            t = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t)
    for impl, ts in times.items():
        result[impl].update(median_s=statistics.median(ts), times_s=ts)
    if spec.get("memory"):
        for impl in steps:
            result[impl]["peak_mib"] = _rss_mib() - base
    return result


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
