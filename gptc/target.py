"""The machine a bundle is compiled for. Of the compiler, only codegen's templates read it;
the runtime names the Target of the device it opens (target_for)."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Target:
    vendor: str          # "amd" | "nvidia"
    arch: str            # "gfx90a", "sm_90", ...
    wavefront: int       # threads that execute in lock step: 64 on CDNA, 32 on RDNA and NVIDIA
    shared_mem: int      # bytes of shared (LDS) memory one block may use without opting in
    matrix_cores: str    # "mfma" (CDNA), "wmma" (RDNA3), "mma" (NVIDIA), "none"
    shared_mem_max: int = 0  # bytes one block may use after opting in (dynamic shared memory); 0: shared_mem

    @property
    def max_shared(self) -> int:
        return self.shared_mem_max or self.shared_mem

    @property
    def name(self) -> str:
        return f"{'hip' if self.vendor == 'amd' else 'cuda'}:{self.arch}"

    def to_dict(self) -> dict:
        return asdict(self)


KNOWN_TARGETS: dict[str, Target] = {
    t.arch: t
    for t in [
        Target("amd", "gfx906", 64, 65536, "none"),
        Target("amd", "gfx908", 64, 65536, "mfma"),
        Target("amd", "gfx90a", 64, 65536, "mfma"),
        Target("amd", "gfx942", 64, 65536, "mfma"),
        Target("amd", "gfx1030", 32, 65536, "none"),
        Target("amd", "gfx1100", 32, 65536, "wmma"),
        Target("nvidia", "sm_80", 32, 49152, "mma", 166912),
        Target("nvidia", "sm_86", 32, 49152, "mma", 101376),
        Target("nvidia", "sm_89", 32, 49152, "mma", 101376),
        Target("nvidia", "sm_90", 32, 49152, "mma", 232448),
    ]
}


class UnknownTargetError(ValueError):
    pass


def parse_target(text: str) -> Target:
    """'hip:gfx90a', 'cuda:sm_90', or a bare arch name -> Target."""
    vendor_prefix, _, arch = text.rpartition(":")
    target = KNOWN_TARGETS.get(arch)
    expected_vendor = {"hip": "amd", "amd": "amd", "cuda": "nvidia", "nvidia": "nvidia", "": None}.get(vendor_prefix, "?")
    if target is None or (expected_vendor is not None and expected_vendor != target.vendor):
        known = ", ".join(t.name for t in KNOWN_TARGETS.values())
        raise UnknownTargetError(f"unknown target '{text}'; known targets: {known}")
    return target


def target_for(vendor: str, arch: str) -> Target:
    """The known Target for an arch reported by a device, or a reasonable new one."""
    arch = arch.split(":")[0]  # "gfx90a:sramecc+:xnack-" -> "gfx90a"
    t = KNOWN_TARGETS.get(arch)
    if t is not None and t.vendor == vendor:
        return t
    if vendor == "nvidia":
        return Target("nvidia", arch, 32, 49152, "mma")
    cdna = arch.startswith("gfx9")
    return Target("amd", arch, 64 if cdna else 32, 65536,
                  "mfma" if arch in ("gfx908", "gfx90a") or arch.startswith("gfx94") or arch.startswith("gfx95")
                  else ("wmma" if arch.startswith("gfx11") or arch.startswith("gfx12") else "none"))
