"""The dtype an encoder runs in: named, chosen for the machine, and held to measured fidelity.

``choose_dtype(requested, device)`` is the one place that answers "which dtype?": an explicit
name (``fp32``, ``bf16``, ``fp16``, ``int8``), else ``$BINDSEARCH_DTYPE``, else ``auto``:

* CUDA: bf16 where the GPU supports it, fp16 on older GPUs (as before);
* CPU: bf16 when the CPU multiplies bf16 matrices natively (``cpu_has_native_bf16``: the
  ``avx512_bf16``/``amx_bf16`` flags on x86, ``bf16`` on Arm), fp32 elsewhere (on AVX2 alone
  bf16 is emulated and slower than fp32).

The dtype is a speed setting, not part of the model: an index built in bf16 is searched by
an fp32 encoder and vice versa (the vectors differ by cosine ``1 - REDUCED_BOUNDS[dtype]`` at
most on the parity fixtures, see ``OFFERED``).

``int8`` is dynamic int8 quantisation of the transformer trunks' linear layers (weights int8
per tensor, activations quantised per batch) on CPU; everything else stays fp32.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .modality import TOWERS, Modality

log = logging.getLogger(__name__)

DTYPE_ENV = "BINDSEARCH_DTYPE"  # the default of every command and of the service
NATIVE_BF16_ENV = "BINDSEARCH_NATIVE_BF16"  # force the probe's answer: 1/0 (tests), or "measure"

# Canonical names (what the manifest, /v1/info and the bench record) and what users may type.
NAMES = ("float32", "bfloat16", "float16", "int8")
_ALIASES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "int8": "int8",
    "qint8": "int8",
}
ACCEPTED = "fp32, bf16, fp16, int8 or auto"
DTYPE_HELP = (
    "fp32, bf16, fp16, int8 (CPU) or auto: bf16 on CPUs with native bf16 (avx512_bf16, "
    "amx_bf16, Arm bf16) and GPUs, fp32 on other CPUs."
)

# The lowest cosine to the fp32 official outputs each reduced dtype must keep on every parity
# fixture case (tests/test_dtype_fidelity.py measures it), and the towers that keep it: a
# tower not listed runs in fp32 when that dtype is asked for. Measured on the fixtures (minimum
# over each modality's cases): bf16 >= 0.9993 (text), int8 >= 0.9980 (text).
REDUCED_BOUNDS = {"bfloat16": 0.999, "float16": 0.999, "int8": 0.99}
OFFERED: dict[str, frozenset[Modality]] = {
    "bfloat16": frozenset(TOWERS),
    "float16": frozenset(TOWERS),
    "int8": frozenset(TOWERS),
}

# x86 flags (/proc/cpuinfo "flags") and Arm features ("Features") of native bf16 matmul.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
CPUINFO = Path("/proc/cpuinfo")
MEASURED_MIN_SPEEDUP = 1.3  # the measured probe says "native" when bf16 matmul is this much faster


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype: its canonical ``name``, the tensors' ``torch_dtype`` and why."""

    name: str  # one of NAMES
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of parameters and activations (int8: fp32 around the int8 matmuls)."""
        return {
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
            "int8": torch.float32,
        }[self.name]

    @property
    def quantized(self) -> bool:
        return self.name == "int8"


def parse_dtype(value: str | torch.dtype | None) -> str:
    """A user's dtype -> a canonical name, or "auto"; ``ValueError`` naming what is accepted."""
    if value is None:
        return "auto"
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name not in NAMES:
            raise ValueError(f"dtype {name} is not supported; use {ACCEPTED}")
        return name
    key = str(value).strip().lower()
    if key == "auto":
        return "auto"
    if key not in _ALIASES:
        raise ValueError(f"dtype {value!r} is not one of {ACCEPTED}")
    return _ALIASES[key]


def choose_dtype(
    requested: str | torch.dtype | None = None, device: str | torch.device = "cpu"
) -> DtypeChoice:
    """The dtype to run in on ``device``: ``requested``, else ``$BINDSEARCH_DTYPE``, else auto."""
    dev = torch.device(device)
    name = parse_dtype(requested)
    source = "asked for"
    if name == "auto" and requested is None and os.environ.get(DTYPE_ENV):
        try:
            name = parse_dtype(os.environ[DTYPE_ENV])
        except ValueError as e:
            raise ValueError(f"${DTYPE_ENV}: {e}") from None
        source = f"${DTYPE_ENV}"
    if name == "int8" and dev.type != "cpu":
        raise ValueError(f"dtype int8 runs on CPU only, not on {dev.type}; use bf16 or fp16 there")
    if name != "auto":
        return DtypeChoice(name, source)
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "auto: the GPU supports bf16")
        return DtypeChoice("float16", "auto: the GPU has no bf16")
    if dev.type == "cpu" and cpu_has_native_bf16():
        return DtypeChoice("bfloat16", f"auto: {native_bf16_reason()}")
    return DtypeChoice("float32", f"auto: {native_bf16_reason()}")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()``."""
    try:
        for line in CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model name", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def native_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 flags this CPU has (``avx512_bf16``, ``amx_bf16``, Arm ``bf16``)."""
    have = cpu_flags()
    return tuple(f for f in BF16_FLAGS if f in have)


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (so bf16 beats fp32).

    ``$BINDSEARCH_NATIVE_BF16`` forces the answer (1/0), or asks for the measured probe
    ("measure"). Otherwise: torch's CPU capability must be vectorised (not DEFAULT) and the
    CPU must list a native bf16 flag; where no flags can be read (no ``/proc/cpuinfo``) a
    short bf16/fp32 matmul probe decides, cached per CPU model and torch version.
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes"):
        return True
    if forced in ("0", "false", "no"):
        return False
    if forced == "measure" or not cpu_flags():
        return measured_bf16_speedup() >= MEASURED_MIN_SPEEDUP
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "NO AVX"):
        return False
    return bool(native_bf16_flags())


def native_bf16_reason() -> str:
    """One line: what the probe saw (for logs, ``/v1/info`` notes and the bench)."""
    forced = os.environ.get(NATIVE_BF16_ENV, "").strip()
    if forced and forced.lower() != "measure":
        return f"${NATIVE_BF16_ENV}={forced}"
    cap = torch.backends.cpu.get_cpu_capability()
    flags = native_bf16_flags()
    if flags:
        return f"CPU capability {cap}, native bf16 ({', '.join(flags)})"
    if not cpu_flags() or forced.lower() == "measure":
        return f"CPU capability {cap}, bf16 matmul {measured_bf16_speedup():.2f}x fp32 (measured)"
    return f"CPU capability {cap}, no native bf16 (no avx512_bf16/amx_bf16/bf16 flag)"


def probe_cache_file() -> Path:
    from .weights import cache_root

    return cache_root() / "dtype_probe.json"


def measured_bf16_speedup(size: int = 512, reps: int = 5) -> float:
    """bf16 over fp32 ``torch.mm`` rate on this CPU, measured once per CPU model and torch."""
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = probe_cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(cached, dict) and isinstance(cached.get(key), int | float):
            return float(cached[key])
    except (OSError, ValueError):
        cached = {}
    rates = {}
    for dt in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dt)
        a @ a  # warm-up: oneDNN picks and caches its kernel
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        rates[dt] = 1.0 / max(best, 1e-9)
    speedup = rates[torch.bfloat16] / rates[torch.float32]
    try:
        entries = cached if isinstance(cached, dict) else {}
        entries[key] = round(speedup, 3)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1), encoding="utf-8")
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs the probe again next time
    return speedup


def offered_towers(choice: DtypeChoice, towers: Iterable[Modality]) -> tuple[set[Modality], str]:
    """The towers that run in ``choice`` (the rest run in fp32), and a note on those that don't."""
    towers = set(towers)
    if choice.name == "float32":
        return towers, ""
    ok = {t for t in towers if t in OFFERED.get(choice.name, frozenset())}
    left = sorted(t.value for t in towers - ok)
    note = (
        f"{', '.join(left)} not offered in {choice.name} (below cosine "
        f"{REDUCED_BOUNDS[choice.name]} to fp32): run in float32"
        if left
        else ""
    )
    return ok, note


def quantize_int8(module: nn.Module) -> nn.Module:
    """Dynamic int8 quantisation of ``module``'s linear layers, the fused qkv projections too.

    Weights become int8 (per tensor), activations are quantised per batch on the fly
    (``torch.ao``'s dynamic quantised linear, fbgemm on x86, qnnpack on Arm). CPU only.
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from .model import Attention

    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao, which is not a dependency.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        for mod in list(module.modules()):
            if isinstance(mod, Attention) and mod.in_proj is None:
                dim = mod.in_proj_weight.shape[1]
                dense = nn.Linear(dim, 3 * dim, device="meta")  # takes the weights below
                dense.weight = mod.in_proj_weight
                dense.bias = mod.in_proj_bias
                dense.qconfig = default_dynamic_qconfig  # type: ignore[assignment]
                mod.in_proj = DynamicLinear.from_float(dense)  # type: ignore[no-untyped-call]
                # The int8 copy replaces the fp32 weights: free them (3 x dim^2 floats a block).
                del mod.in_proj_weight, mod.in_proj_bias
        out: nn.Module = quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {nn.Linear}, dtype=torch.qint8, inplace=True
        )
    return out
