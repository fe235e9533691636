"""Bus actors, the platform layer, the instance agent and the host process.

- `LifecycleActor`: kernel instances from create to delete (the `lifecycle` service), through the
  kernel's states, with verified images and negotiated shutdown (docs/lifecycle.md).
- `LocalPlatform`: an instance as an isolated process tree: PID/UTS/mount namespaces, cpuset and
  memory cgroups, CPU affinity, and cache ways of its own where the machine has resctrl
  (`CacheShare`; docs/platform.md); `Platform` is the interface. `MultikernelPlatform`: an
  instance as a kernel of its own on a multikernel kernel, driven through the kernel's own
  interfaces behind one seam (`MultikernelKernel`: `SysfsKernel` on such a machine), its agent
  reached over AF_VSOCK (`VsockConnector`), booting a `BootImage` (docs/platform.md).
- Images in the kernel's appended-signature format: `sign_image`, `verify_image`, `load_image`,
  `make_signing_key`; `pack_nix`, an image of a Nix store path and its closure (docs/images.md).
- `ResourceActor`: the host's pool of CPUs, memory blocks and I/O queues (`discover_pool`,
  `Pool`) and every grant of it (the `resource` service), as transactions the instance's agent
  acknowledges; placement is a `PlacementPolicy` plugin (`PackPolicy`, `SpreadPolicy`,
  `ScoredPolicy` for an eBPF scorer). Instances grow and shrink themselves within the host's
  `ElasticBounds`; an optional rebalancer is a `RebalancePolicy` plugin (`PressureRebalancer`)
  deciding `Resize`s from a `RebalanceState` of load reports. docs/resources.md.
  `multikernel.services.testing` has a fake machine (`FakeSysfs`), a fake resctrl
  (`FakeResctrl`), a fake agent (`FakeAgent`) and a fake multikernel kernel (`FakeMultikernel`,
  with `boot_init` and `UnixVsock`) for tests.
- `run_host` / `python -m multikernel.services.host`: the hub and the actors (`mkctl host up`);
  the resource actor runs in a process of its own (`python -m multikernel.services.resource`).
- `python -m multikernel.services.agent`: the first process of every instance.
"""

# The names below are imported on first use (PEP 562): the instance agent starts from this
# package, and importing the whole facade (hub, cryptography, ...) would add ~0.2 s to every
# instance's start. Type checkers see ordinary imports.
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multikernel.services._elastic import ElasticBounds as ElasticBounds
    from multikernel.services._host import HostConfig as HostConfig
    from multikernel.services._host import run_host as run_host
    from multikernel.services._image import LoadedImage as LoadedImage
    from multikernel.services._image import VerifiedImage as VerifiedImage
    from multikernel.services._image import load_image as load_image
    from multikernel.services._image import pack as pack
    from multikernel.services._image import sign_image as sign_image
    from multikernel.services._image import verify_image as verify_image
    from multikernel.services._instances import InstanceError as InstanceError
    from multikernel.services._lifecycle import LifecycleActor as LifecycleActor
    from multikernel.services._local import LocalPlatform as LocalPlatform
    from multikernel.services._manifest import ImageError as ImageError
    from multikernel.services._manifest import Manifest as Manifest
    from multikernel.services._mk_kernel import MultikernelKernel as MultikernelKernel
    from multikernel.services._mk_kernel import SysfsKernel as SysfsKernel
    from multikernel.services._mk_steps import BootImage as BootImage
    from multikernel.services._mk_vsock import VsockConnector as VsockConnector
    from multikernel.services._multikernel import MultikernelPlatform as MultikernelPlatform
    from multikernel.services._nix import NixError as NixError
    from multikernel.services._nix import NixImage as NixImage
    from multikernel.services._nix import pack_nix as pack_nix
    from multikernel.services._placement import CpuScorer as CpuScorer
    from multikernel.services._placement import Holding as Holding
    from multikernel.services._placement import Placement as Placement
    from multikernel.services._placement import PlacementPolicy as PlacementPolicy
    from multikernel.services._placement import PlacementRequest as PlacementRequest
    from multikernel.services._placement import PoolState as PoolState
    from multikernel.services._placement import Refusal as Refusal
    from multikernel.services._placement import place as place
    from multikernel.services._platform import CacheShare as CacheShare
    from multikernel.services._platform import Capabilities as Capabilities
    from multikernel.services._platform import InstanceProcess as InstanceProcess
    from multikernel.services._platform import IsolationReport as IsolationReport
    from multikernel.services._platform import LaunchSpec as LaunchSpec
    from multikernel.services._platform import Platform as Platform
    from multikernel.services._platform import PlatformError as PlatformError
    from multikernel.services._platform import Resources as Resources
    from multikernel.services._policies import PackPolicy as PackPolicy
    from multikernel.services._policies import ScoredPolicy as ScoredPolicy
    from multikernel.services._policies import SpreadPolicy as SpreadPolicy
    from multikernel.services._policies import load_policy as load_policy
    from multikernel.services._pool import Pool as Pool
    from multikernel.services._pool import PoolError as PoolError
    from multikernel.services._pool import discover_pool as discover_pool
    from multikernel.services._rebalance import InstanceView as InstanceView
    from multikernel.services._rebalance import PressureRebalancer as PressureRebalancer
    from multikernel.services._rebalance import RebalancePolicy as RebalancePolicy
    from multikernel.services._rebalance import RebalanceState as RebalanceState
    from multikernel.services._rebalance import Resize as Resize
    from multikernel.services._rebalance import load_rebalancer as load_rebalancer
    from multikernel.services._resource import ResourceActor as ResourceActor
    from multikernel.services._resource_process import ResourceConfig as ResourceConfig
    from multikernel.services._resource_store import ResourceStore as ResourceStore
    from multikernel.services._signature import BadSignatureError as BadSignatureError
    from multikernel.services._signature import SignatureError as SignatureError
    from multikernel.services._signature import SignerInfo as SignerInfo
    from multikernel.services._signature import UnsignedImageError as UnsignedImageError
    from multikernel.services._signature import UntrustedSignerError as UntrustedSignerError
    from multikernel.services._signature import make_signing_key as make_signing_key

_LAZY = {
    "BadSignatureError": "multikernel.services._signature",
    "BootImage": "multikernel.services._mk_steps",
    "CacheShare": "multikernel.services._platform",
    "Capabilities": "multikernel.services._platform",
    "CpuScorer": "multikernel.services._placement",
    "discover_pool": "multikernel.services._pool",
    "ElasticBounds": "multikernel.services._elastic",
    "Holding": "multikernel.services._placement",
    "HostConfig": "multikernel.services._host",
    "ImageError": "multikernel.services._manifest",
    "InstanceError": "multikernel.services._instances",
    "InstanceProcess": "multikernel.services._platform",
    "InstanceView": "multikernel.services._rebalance",
    "IsolationReport": "multikernel.services._platform",
    "LaunchSpec": "multikernel.services._platform",
    "LifecycleActor": "multikernel.services._lifecycle",
    "load_image": "multikernel.services._image",
    "load_policy": "multikernel.services._policies",
    "load_rebalancer": "multikernel.services._rebalance",
    "LoadedImage": "multikernel.services._image",
    "LocalPlatform": "multikernel.services._local",
    "make_signing_key": "multikernel.services._signature",
    "Manifest": "multikernel.services._manifest",
    "MultikernelKernel": "multikernel.services._mk_kernel",
    "MultikernelPlatform": "multikernel.services._multikernel",
    "NixError": "multikernel.services._nix",
    "NixImage": "multikernel.services._nix",
    "pack_nix": "multikernel.services._nix",
    "pack": "multikernel.services._image",
    "PackPolicy": "multikernel.services._policies",
    "place": "multikernel.services._placement",
    "Placement": "multikernel.services._placement",
    "PlacementPolicy": "multikernel.services._placement",
    "PlacementRequest": "multikernel.services._placement",
    "Platform": "multikernel.services._platform",
    "PlatformError": "multikernel.services._platform",
    "Pool": "multikernel.services._pool",
    "PoolError": "multikernel.services._pool",
    "PoolState": "multikernel.services._placement",
    "PressureRebalancer": "multikernel.services._rebalance",
    "RebalancePolicy": "multikernel.services._rebalance",
    "RebalanceState": "multikernel.services._rebalance",
    "Refusal": "multikernel.services._placement",
    "Resize": "multikernel.services._rebalance",
    "ResourceActor": "multikernel.services._resource",
    "ResourceConfig": "multikernel.services._resource_process",
    "Resources": "multikernel.services._platform",
    "ResourceStore": "multikernel.services._resource_store",
    "run_host": "multikernel.services._host",
    "ScoredPolicy": "multikernel.services._policies",
    "sign_image": "multikernel.services._image",
    "SignatureError": "multikernel.services._signature",
    "SignerInfo": "multikernel.services._signature",
    "SpreadPolicy": "multikernel.services._policies",
    "SysfsKernel": "multikernel.services._mk_kernel",
    "UnsignedImageError": "multikernel.services._signature",
    "UntrustedSignerError": "multikernel.services._signature",
    "VerifiedImage": "multikernel.services._image",
    "verify_image": "multikernel.services._image",
    "VsockConnector": "multikernel.services._mk_vsock",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'multikernel.services' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
