"""The machine a benchmark ran on, as one line: CPU model, the ISA extensions the kernels care
about (AVX-512, AVX512-BF16, AMX), the torch and transformers versions and the thread count; and
the CPU's vendor, by which the sampler picks its one-row matmul (engine.ONE_ROW_GEMV)."""
import functools
import subprocess

import torch

ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # AVX-512, AVX512-BF16, AMX


def parse_cpuinfo(text):
    """(CPU model, the ISA_FLAGS it lists) from /proc/cpuinfo or `lscpu` text ("model name" /
    "Model name", "flags" / "Flags" lines; the first of each counts)."""
    model, flags = None, None
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        key = key.strip().lower()
        if sep and key == "model name" and model is None:
            model = val.strip()
        elif sep and key in ("flags", "features") and flags is None:
            flags = set(val.split())
    return model or "unknown CPU", [f for f in ISA_FLAGS if f in (flags or ())]


def cpu_vendor(text):
    """The vendor string of /proc/cpuinfo ("vendor_id") or `lscpu` ("Vendor ID") text, e.g.
    "GenuineIntel" or "AuthenticAMD"; "" when the text names none."""
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep and key.strip().lower() in ("vendor_id", "vendor id"):
            return val.strip()
    return ""


@functools.cache
def read_cpuinfo():
    """This machine's /proc/cpuinfo, else `lscpu`'s output, else "" (read once per process)."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        try:
            return subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""


def machine_info(threads, cpuinfo=None):
    """One line: CPU model, which of ISA_FLAGS it has, torch and transformers versions, threads.
    `cpuinfo`: the text to parse (default: read_cpuinfo())."""
    from importlib.metadata import PackageNotFoundError, version
    model, have = parse_cpuinfo(read_cpuinfo() if cpuinfo is None else cpuinfo)
    isa = ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in ISA_FLAGS)
    try:
        hf = version("transformers")
    except PackageNotFoundError:
        hf = "not installed"
    return f"machine: {model}; {isa}; torch {torch.__version__}; transformers {hf}; {threads} threads"
