"""The benchmarks' machine line (machine.py): CPU model and ISA extensions parsed from planted
cpuinfo / lscpu text."""
import torch

import machine

XEON = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512dq avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512_vnni_not_a_match
"""

LSCPU = """Architecture:            x86_64
Model name:              Intel(R) Xeon(R) CPU @ 2.20GHz
Flags:                   fpu avx avx2 avx512f avx512bw
"""


def test_parse_xeon_with_amx():
    model, have = machine.parse_cpuinfo(XEON)
    assert model == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz"
    assert have == ["avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]


def test_parse_epyc_without_avx512():
    assert machine.parse_cpuinfo(EPYC) == ("AMD EPYC", [])  # whole flags only, no substring matches


def test_parse_lscpu_and_empty():
    assert machine.parse_cpuinfo(LSCPU) == ("Intel(R) Xeon(R) CPU @ 2.20GHz", ["avx512f"])
    assert machine.parse_cpuinfo("") == ("unknown CPU", [])


def test_machine_info_line():
    line = machine.machine_info(2, cpuinfo=XEON)
    assert line.startswith("machine: Intel(R) Xeon(R) Platinum 8481C")
    assert "avx512f yes, avx512_bf16 yes, amx_bf16 yes, amx_tile yes" in line
    assert f"torch {torch.__version__}" in line and "transformers " in line and line.endswith("2 threads")
    assert "avx512f no, avx512_bf16 no, amx_bf16 no, amx_tile no" in machine.machine_info(4, cpuinfo=EPYC)
    assert "machine: " in machine.machine_info(1)  # this machine's /proc/cpuinfo (or lscpu)


def test_cpu_vendor_from_cpuinfo_and_lscpu():
    assert machine.cpu_vendor(XEON) == "GenuineIntel"
    assert machine.cpu_vendor(EPYC) == "AuthenticAMD"
    assert machine.cpu_vendor("Architecture: x86_64\nVendor ID:    AuthenticAMD\n") == "AuthenticAMD"
    assert machine.cpu_vendor(LSCPU) == ""  # no vendor line: neither vendor is assumed
