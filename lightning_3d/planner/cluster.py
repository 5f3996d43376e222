"""The machines a plan is for: how many devices, how much memory each, how fast they compute
and talk. Known devices come with defaults; any figure can be given instead (``cluster.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from lightning_3d.errors import ConfigError
from lightning_3d.flops import PEAK_FLOPS, peak_flops

_GIB = 2**30


@dataclass(frozen=True)
class DeviceDefaults:
    """Per device: memory the allocator can use, and per-direction link bandwidths (GB/s).

    Bandwidths are the vendor's link rates, per direction and per device: NVLink 4 (H100,
    H200) 450 GB/s, NVLink 3 (A100) 300 GB/s; one 400 Gb/s NIC per H100/H200 (50 GB/s),
    one 200 Gb/s NIC per A100 (25 GB/s). ``CPU``: this project's CI machine kind (2 shared
    cores, 8 gloo processes over loopback, measured for docs/planner.md: about 50 GFLOP/s of fp32
    matmuls for the host, 4-20 ms for a small collective, 0.1-0.2 GB/s for MB-sized ones); its
    memory and FLOP/s are the host's, shared by a node's processes, and the runtime each process
    holds before training (Python, torch, Lightning: ~0.45 GiB) is reserved.
    """

    memory_gib: float
    peak_tflops: float  # dense bf16 (fp32 matmuls of the whole host for CPU)
    intra_node_gbps: float
    inter_node_gbps: float
    intra_node_latency_us: float  # per hop of a ring
    inter_node_latency_us: float
    reserved_gib: float  # runtime context and allocator slack kept out of the plan's reach
    overlap: float = 1.0  # data-parallel communication hidden behind compute (none where both share CPU cores)


KNOWN_DEVICES: dict[str, DeviceDefaults] = {
    "H100": DeviceDefaults(79.6, PEAK_FLOPS["H100"]["half"] / 1e12, 450.0, 50.0, 3.0, 10.0, 4.0),
    "H200": DeviceDefaults(139.8, PEAK_FLOPS["H200"]["half"] / 1e12, 450.0, 50.0, 3.0, 10.0, 4.0),
    "A100": DeviceDefaults(79.2, PEAK_FLOPS["A100"]["half"] / 1e12, 300.0, 25.0, 3.0, 10.0, 4.0),
    # the host's memory and FLOP/s, shared by the processes of a node (see resolve_cluster)
    "CPU": DeviceDefaults(0.0, 0.05, 0.25, 0.25, 300.0, 300.0, 0.45, overlap=0.0),
}


def _host_memory_gib() -> float:
    """This machine's memory (Linux; 16 GiB where it cannot be read)."""
    try:
        with open("/proc/meminfo") as handle:
            return int(handle.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return 16.0


@dataclass
class ClusterConfig:
    """``cluster.*``: the machines to plan for (Hydra group ``conf/cluster/``).

    None takes the default: ``gpus`` = trainer.devices × trainer.num_nodes, ``gpus_per_node``
    = trainer.devices, ``gpu`` = CPU for trainer.accelerator=cpu; every figure from
    :data:`KNOWN_DEVICES` for a known ``gpu``.
    """

    gpus: Optional[int] = None
    gpus_per_node: Optional[int] = None
    gpu: Optional[str] = None  # H100 | H200 | A100 | CPU, or any name with the figures below
    gpu_memory_gib: Optional[float] = None
    peak_tflops: Optional[float] = None  # dense, at the run's precision
    compute_efficiency: float = 0.5  # fraction of peak the matmuls reach
    intra_node_gbps: Optional[float] = None  # per device and direction, GB/s
    inter_node_gbps: Optional[float] = None
    intra_node_latency_us: Optional[float] = None  # per hop of a ring (n−1 per all-gather over n ranks, 1 per send)
    inter_node_latency_us: Optional[float] = None
    comm_efficiency: float = 0.8  # fraction of the link rate collectives reach
    overlap: Optional[float] = None  # fraction of compute time data-parallel communication can hide behind
    reserved_gib: Optional[float] = None  # kept free per device (runtime context, allocator slack)


@dataclass(frozen=True)
class Cluster:
    """A :class:`ClusterConfig` with every figure resolved (bytes, FLOP/s, bytes/s, seconds)."""

    gpus: int
    gpus_per_node: int
    gpu: str
    memory_bytes: int
    reserved_bytes: int
    peak_flops: float
    compute_efficiency: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    intra_node_latency: float
    inter_node_latency: float
    overlap: float = 1.0
    shared_host: bool = False  # the devices are processes sharing one host's cores (CPU)

    @property
    def nodes(self) -> int:
        return self.gpus // self.gpus_per_node

    @property
    def usable_bytes(self) -> int:
        return self.memory_bytes - self.reserved_bytes

    def describe(self) -> str:
        return (
            f"{self.gpus} × {self.gpu} ({self.nodes} node{'s' if self.nodes > 1 else ''} of {self.gpus_per_node}), "
            f"{self.memory_bytes / _GIB:.1f} GiB each ({self.reserved_bytes / _GIB:.1f} reserved), "
            f"{self.peak_flops / 1e12:.4g} TFLOP/s peak × {self.compute_efficiency:.2f}, links "
            f"{self.intra_node_bandwidth / 1e9:.4g} GB/s in a node, {self.inter_node_bandwidth / 1e9:.4g} GB/s across"
        )


def _default_peak(name: str, known: DeviceDefaults, precision: str) -> float:
    """TFLOP/s of a known device at the run's precision (its bf16 figure when the table has none)."""
    peak = peak_flops(name, precision)
    return peak / 1e12 if peak is not None else known.peak_tflops


def _known(name: str) -> Optional[DeviceDefaults]:
    upper = name.upper()
    return next((KNOWN_DEVICES[key] for key in sorted(KNOWN_DEVICES, key=len, reverse=True) if key in upper), None)


def resolve_cluster(
    config: ClusterConfig, devices: int = 1, num_nodes: int = 1, accelerator: str = "gpu", precision: str = "bf16-mixed"
) -> Cluster:
    """Every figure of the cluster, or a :class:`ConfigError` naming each one missing or wrong.

    ``devices``, ``num_nodes``, ``accelerator``: the trainer's, for the defaults of ``gpus``,
    ``gpus_per_node`` and ``gpu``; ``precision``: which peak of a known GPU applies (bf16 or fp32,
    ``lightning_3d.flops.peak_flops``).
    """
    problems = []
    gpus = config.gpus if config.gpus is not None else devices * num_nodes
    per_node = config.gpus_per_node if config.gpus_per_node is not None else min(devices, gpus)
    if gpus < 1:
        problems.append(f"cluster.gpus={gpus} must be >= 1")
    if per_node < 1:
        problems.append(f"cluster.gpus_per_node={per_node} must be >= 1")
    elif gpus >= 1 and gpus % per_node:
        nodes = gpus / per_node
        problems.append(
            f"cluster.gpus={gpus} is not divisible by cluster.gpus_per_node={per_node} ({nodes:.2f} nodes); "
            f"use a multiple of {per_node}: {[n * per_node for n in (max(1, gpus // per_node), gpus // per_node + 1)]}"
        )
    name = config.gpu or ("CPU" if accelerator == "cpu" else None)
    if name is None:
        problems.append("cluster.gpu is not set: name the device (H100, H200, A100, CPU) or give cluster.gpu_memory_gib and cluster.peak_tflops")
        name = "?"
    known = _known(name)
    if known is None:
        missing = [key for key in ("gpu_memory_gib", "peak_tflops") if getattr(config, key) is None]
        if missing:
            problems.append(
                f"cluster.gpu={name!r} is not a known device ({', '.join(KNOWN_DEVICES)}); give "
                + " and ".join(f"cluster.{key}" for key in missing)
                + " for it (link figures default to 100 GB/s in a node and 12.5 GB/s across)"
            )
        known = DeviceDefaults(config.gpu_memory_gib or 0.0, config.peak_tflops or 0.0, 100.0, 12.5, 3.0, 10.0, 2.0)
    for key in ("gpu_memory_gib", "peak_tflops", "intra_node_gbps", "inter_node_gbps", "compute_efficiency", "comm_efficiency"):
        value = getattr(config, key)
        if value is not None and value <= 0:
            problems.append(f"cluster.{key}={value} must be > 0")
    if config.overlap is not None and not 0 <= config.overlap <= 1:
        problems.append(f"cluster.overlap={config.overlap} is a fraction: between 0 and 1")
    for key in ("compute_efficiency", "comm_efficiency"):
        if getattr(config, key) > 1:
            problems.append(f"cluster.{key}={getattr(config, key)} is a fraction of the peak: at most 1")
    if problems:
        raise ConfigError("invalid cluster:\n  - " + "\n  - ".join(problems))

    def pick(key: str, default: float) -> float:
        value = getattr(config, key)
        return float(value) if value is not None else default

    shared = known is KNOWN_DEVICES["CPU"]  # a node's processes share the host's memory and cores
    memory = pick("gpu_memory_gib", _host_memory_gib() / per_node if shared else known.memory_gib) * _GIB
    reserved = pick("reserved_gib", known.reserved_gib) * _GIB
    if reserved >= memory:
        raise ConfigError(f"cluster.reserved_gib={reserved / _GIB:g} leaves nothing of the device's {memory / _GIB:g} GiB")
    links = config.comm_efficiency * 1e9
    return Cluster(
        gpus=gpus,
        gpus_per_node=per_node,
        gpu=name,
        memory_bytes=int(memory),
        reserved_bytes=int(reserved),
        peak_flops=pick("peak_tflops", _default_peak(name, known, precision) / (per_node if shared else 1)) * 1e12,
        compute_efficiency=config.compute_efficiency,
        intra_node_bandwidth=pick("intra_node_gbps", known.intra_node_gbps) * links,
        inter_node_bandwidth=pick("inter_node_gbps", known.inter_node_gbps) * links,
        intra_node_latency=pick("intra_node_latency_us", known.intra_node_latency_us) * 1e-6,
        inter_node_latency=pick("inter_node_latency_us", known.inter_node_latency_us) * 1e-6,
        overlap=pick("overlap", known.overlap),
        shared_host=shared,
    )
