"""The machine a benchmark ran on, as one line: CPU model, the ISA extensions the kernels care
about (AVX-512, AVX512-BF16, AMX), the torch and transformers versions and the thread count."""
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


def machine_info(threads, cpuinfo=None):
    """One line: CPU model, which of ISA_FLAGS it has, torch and transformers versions, threads.
    `cpuinfo`: the text to parse (default /proc/cpuinfo, else `lscpu`'s output)."""
    from importlib.metadata import PackageNotFoundError, version
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            try:
                cpuinfo = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                cpuinfo = ""
    model, have = parse_cpuinfo(cpuinfo)
    isa = ", ".join(f"{f} {'yes' if f in have else 'no'}" for f in ISA_FLAGS)
    try:
        hf = version("transformers")
    except PackageNotFoundError:
        hf = "not installed"
    return f"machine: {model}; {isa}; torch {torch.__version__}; transformers {hf}; {threads} threads"
