"""A pytest plugin for benchmarks/gpu_check.sh (`-p compile_log`): with
FUSED_PREACT_COMPILE_LOG=FILE set, every Triton compile appends a line
"kernel seconds" to FILE, so that each step of a GPU check reports the
cold-compile cost it paid (the next run's step limits come from it)."""
import os
import time


def pytest_configure(config):
    path = os.environ.get("FUSED_PREACT_COMPILE_LOG")
    if not path:
        return
    from triton import knobs

    started = {}

    def before(*, key, **kwargs):
        started[key] = time.perf_counter()
        return False  # compile as usual

    def after(*, key, fn, **kwargs):
        seconds = time.perf_counter() - started.pop(key, time.perf_counter())
        with open(path, "a") as log:
            log.write(f"{fn.name} {seconds:.3f}\n")

    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
