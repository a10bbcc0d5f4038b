"""Loading the peer implementations (ByzFL, Flower) beside QFLARE's CPU-only torch.

Test and benchmark use only. ``import byzfl`` runs a package init that imports
torchvision and seaborn, though the aggregators and attacks never use them: the two
subpackages are imported under a bare package module instead. Flower's ``flwr.server.strategy.aggregate`` is
plain NumPy, but importing it through the package pulls protobuf, grpc and more; the one
file is executed with stand-ins for its two type-only imports.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any


def load_byzfl() -> Any:
    """byzfl's aggregators and attacks as one namespace (ImportError when not installed).

    The package init also imports its benchmark and training code, which needs
    torchvision (whose wheels do not load beside this torch) and seaborn (not installed);
    the rules and attacks need neither, so the package is entered without its init.
    """
    if "byzfl.aggregators" not in sys.modules:
        spec = importlib.util.find_spec("byzfl")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("byzfl is not installed")
        pkg = types.ModuleType("byzfl")
        pkg.__path__ = list(spec.submodule_search_locations)  # type: ignore[attr-defined]
        sys.modules.setdefault("byzfl", pkg)
    aggregators = importlib.import_module("byzfl.aggregators")
    attacks = importlib.import_module("byzfl.attacks")
    ns = types.SimpleNamespace()
    for mod in (aggregators, attacks):
        for name in dir(mod):
            if not name.startswith("_"):
                setattr(ns, name, getattr(mod, name))
    return ns


def load_flwr_aggregate() -> Any:
    """Flower's aggregate.py as a module, without importing the flwr package."""
    spec = importlib.util.find_spec("flwr")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("flwr is not installed")
    path = (
        Path(next(iter(spec.submodule_search_locations))) / "server" / "strategy" / "aggregate.py"
    )
    stand_ins = {
        "flwr": types.ModuleType("flwr"),
        "flwr.common": types.ModuleType("flwr.common"),
        "flwr.server": types.ModuleType("flwr.server"),
        "flwr.server.client_proxy": types.ModuleType("flwr.server.client_proxy"),
    }
    common = stand_ins["flwr.common"]
    for name in ("FitRes", "NDArray", "NDArrays"):
        setattr(common, name, object)
    common.parameters_to_ndarrays = lambda p: p  # type: ignore[attr-defined]
    stand_ins["flwr.server.client_proxy"].ClientProxy = object  # type: ignore[attr-defined]
    saved = {k: sys.modules.get(k) for k in stand_ins}
    sys.modules.update(stand_ins)
    try:
        mspec = importlib.util.spec_from_file_location("flwr_aggregate_peer", path)
        assert mspec is not None and mspec.loader is not None
        module = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(module)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module
