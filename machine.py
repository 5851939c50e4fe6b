"""The machine a benchmark ran on, as one line: CPU model, the ISA extensions the kernels care
about (AVX-512, AVX512-BF16, AMX), the torch and transformers versions and the thread count; and
the CPU's vendor, by which the sampler picks its one-row matmul (engine.ONE_ROW_GEMV)."""
import functools
import subprocess

import torch

ISA_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # AVX-512, AVX512-BF16, AMX


def _fields(text):
    """The "key: value" lines of /proc/cpuinfo or `lscpu` text, keys lower-cased, the first value
    of each key kept (/proc/cpuinfo repeats them per processor)."""
    out = {}
    for line in text.splitlines():
        key, sep, val = line.partition(":")
        if sep:
            out.setdefault(key.strip().lower(), val.strip())
    return out


def parse_cpuinfo(text):
    """(CPU model, the ISA_FLAGS it lists) from /proc/cpuinfo or `lscpu` text ("model name" /
    "Model name", "flags" / "Flags" lines; ARM's "Features")."""
    f = _fields(text)
    flags = set((f.get("flags") or f.get("features") or "").split())
    return f.get("model name") or "unknown CPU", [x for x in ISA_FLAGS if x in flags]


def cpu_vendor(text):
    """The vendor string of /proc/cpuinfo ("vendor_id") or `lscpu` ("Vendor ID") text, e.g.
    "GenuineIntel" or "AuthenticAMD"; "" when the text names none."""
    f = _fields(text)
    return f.get("vendor_id") or f.get("vendor id") or ""


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
