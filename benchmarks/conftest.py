"""Plain `pytest` runs each benchmark once, untimed (a smoke test); `pytest --benchmark-only` times them.

What a timed run prints: pytest-benchmark's table narrowed to median seconds, IQR and rounds (its default is
eleven columns, ~220 wide), then a table of what the benchmarks are about, images/s (and MFU on CUDA, GFLOP/s
on the CPU) from each one's extra_info. Configurations that need CUDA are deselected on a machine without it
(one line says how many), instead of 40-odd "SKIPPED" lines under -ra.
"""

import pytest
import torch

NARROW_COLUMNS = ["median", "iqr", "rounds"]
# bench_train.py parameters that only run on CUDA (the reasons: CPU_SKIPS there)
CUDA_ONLY_PARAMS = {"loader": {"dali"}, "precision": {"bf16"}, "mode": {"compile", "compile+graph", "reduce-overhead"}}
WIDTH = 120


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if not config.getoption("benchmark_only", False) and not config.getoption("benchmark_enable", False):
        config.option.benchmark_disable = True
    if not config.getoption("benchmark_columns", None):
        config.option.benchmark_columns = NARROW_COLUMNS


def needs_cuda(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return item.path.name == "bench_train.py" and any(
        params.get(name) in values for name, values in CUDA_ONLY_PARAMS.items())


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    cuda_only = [item for item in items if needs_cuda(item)]
    if cuda_only:
        config.hook.pytest_deselected(items=cuda_only)
        items[:] = [item for item in items if item not in cuda_only]
        config._fastcifar_cuda_only = len(cuda_only)


def rate_rows(benchmarks) -> list[tuple[str, str, str, str]]:
    rows = []
    for bench in benchmarks:
        info = bench.extra_info
        if "images_per_s_median" not in info:
            continue
        if info.get("mfu") is not None:
            compute = f"MFU {100 * info['mfu']:.1f}%"
        elif info.get("achieved_tflops") is not None:
            compute = f"{info['achieved_tflops']:.1f} TFLOP/s"
        elif info.get("achieved_gflops") is not None:
            compute = f"{info['achieved_gflops']:.1f} GFLOP/s"
        else:
            compute = ""
        rows.append((bench.name, f"{info['images_per_s_median']:,.0f}", f"{info['images_per_s_best']:,.0f}", compute))
    return rows


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    cuda_only = getattr(config, "_fastcifar_cuda_only", 0)
    if cuda_only:
        terminalreporter.write_line(f"{cuda_only} CUDA-only benchmark configurations (DALI epoch, bf16, compile, "
                                    f"CUDA graphs) deselected: no CUDA here")
    session = getattr(config, "_benchmarksession", None)
    rows = rate_rows(getattr(session, "benchmarks", None) or [])
    if not rows:
        return
    device = next((b.extra_info.get("device") for b in session.benchmarks if b.extra_info.get("device")), "?")
    terminalreporter.write_sep("-", f"throughput on {device}"[:WIDTH - 10], fullwidth=WIDTH)
    name_width = min(max(len(r[0]) for r in rows), WIDTH - 50)
    terminalreporter.write_line(f"{'benchmark':<{name_width}} {'images/s median':>15} {'best':>9}  compute")
    for name, median, best, compute in rows:
        terminalreporter.write_line(f"{name[:name_width]:<{name_width}} {median:>15} {best:>9}  {compute}")
