"""Allowlisting unpickler for the authors' checkpoints and vocabularies.

The original repositories save whole pickled objects: Show-Attend-Tell pickles its ``nn.Module``s and
``torch.optim.Adam`` (``models.DecoderWithAttention`` …), M² pickles numpy RNG state and a ``data.vocab.Vocab``.
Each converter builds its own :class:`Allowlist` from the building blocks here (``CONTAINERS``, ``TORCH_TENSORS``,
``NUMPY_ARRAYS``) plus stubs for its authors' classes.
Loading them with plain ``pickle``/``torch.load(weights_only=False)`` would import the authors' modules and let the
file call any function.
Here every pickle global is looked up in an :class:`Allowlist` instead of being imported:

* tensor and container plumbing (``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict`` …) maps to the real,
  side-effect-free functions (the same ones ``torch.load(weights_only=True)`` trusts);
* the authors' classes and torch.nn layers map to inert stubs — :class:`PickledModule` (keeps the pickled
  ``_parameters``/``_buffers``/``_modules`` and rebuilds the state dict from them) or :class:`PickledObject` (keeps the
  pickled attributes); no stub has behaviour beyond storing its state, so no pickled module is ever called;
* anything else raises :class:`UnsafePickleError` naming the global, before it is imported.

Both torch containers are read through :func:`torch.load` with this unpickler as ``pickle_module``: the zip container
(torch ≥ 1.6) and the legacy one (torch ≤ 1.5, e.g. the released Show-Attend-Tell checkpoint written by torch 0.4).
"""

from __future__ import annotations

import _compat_pickle
import pickle
import struct
import tarfile
import types
import warnings
import zipfile
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:
    from numpy.core.multiarray import scalar as _numpy_scalar
from torch.serialization import SourceChangeWarning

__all__ = [
    "Allowlist",
    "CheckpointError",
    "CONTAINERS",
    "CorruptCheckpointError",
    "NUMPY_ARRAYS",
    "PickledModule",
    "PickledObject",
    "TORCH_TENSORS",
    "UnsafePickleError",
    "load_checkpoint",
    "load_pickle",
]


class CheckpointError(ValueError):
    """A checkpoint or vocabulary file that cannot be converted (wrong architecture, unsafe, corrupt)."""


class UnsafePickleError(CheckpointError):
    """The pickle names a global that is not on the allowlist; nothing from it was imported or called."""


class CorruptCheckpointError(CheckpointError):
    """The file is truncated or its bytes do not decode as a pickle / torch container."""


class PickledObject:
    """Inert stand-in for a pickled instance of an allowlisted class (an optimizer, a vocabulary …).

    It only stores the pickled attributes (``vars(obj)``); ``pickled_name`` is the original ``module.Class``.
    """

    pickled_name = ""

    def __setstate__(self, state):
        """Store the pickled attribute dict (pickle's BUILD); anything but a str-keyed dict is refused."""
        if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
            raise CorruptCheckpointError(f"unexpected pickled state for {self.pickled_name}: {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self):
        return f"<unpickled {self.pickled_name}>"


class PickledModule(PickledObject):
    """Inert stand-in for a pickled ``torch.nn.Module``: holds its pickled ``__dict__``, runs no authors' code."""

    # torch's legacy loader reads `dump_patches` when the file embeds the class source; False = never write patch files.
    dump_patches = False

    def state_dict(self, prefix: str = "") -> OrderedDict[str, torch.Tensor]:
        """The keys and tensors ``module.state_dict()`` of the original would give.

        Same order as ``nn.Module.state_dict``: own parameters, own persistent buffers, then children depth-first.
        """
        state = self.__dict__
        parameters, buffers, children = (state.get(name, {}) for name in ("_parameters", "_buffers", "_modules"))
        non_persistent = state.get("_non_persistent_buffers_set", set())
        if not all(isinstance(part, Mapping) for part in (parameters, buffers, children)):
            raise CorruptCheckpointError(f"pickled {self.pickled_name} has malformed _parameters/_buffers/_modules")
        result = OrderedDict()
        for name, tensor in [*parameters.items(), *((n, b) for n, b in buffers.items() if n not in non_persistent)]:
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CorruptCheckpointError(f"{prefix}{name} in pickled {self.pickled_name} is not a tensor")
            result[prefix + name] = tensor.detach()
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, PickledModule):
                raise CorruptCheckpointError(f"submodule {prefix}{name} of {self.pickled_name} is not a pickled module")
            result.update(child.state_dict(prefix=f"{prefix}{name}."))
        return result


def _stub(qualified_name: str, base: type[PickledObject]) -> type[PickledObject]:
    """A fresh stub class standing for the pickled global ``qualified_name``."""
    return type(qualified_name.rsplit(".", 1)[-1], (base,), {"pickled_name": qualified_name, "__module__": __name__})


def _codecs_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` objects; only the latin-1 form is accepted."""
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` restricted to plain ``ndarray`` (how numpy arrays and RNG states are pickled)."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct a numpy array of type {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


@dataclass(frozen=True)
class Allowlist:
    """The globals a kind of pickle may name, each mapped to what the unpickler returns for it.

    ``kind`` completes the refusal message ("… not an allowed class in a <kind>"), e.g. "Show-Attend-Tell checkpoint".
    """

    kind: str
    globals: Mapping[str, Any]

    @classmethod
    def build(cls, kind, *groups: Mapping[str, Any], modules=(), objects=()) -> Allowlist:
        """Merge ``groups`` and add a :class:`PickledModule` stub per name in ``modules`` and a
        :class:`PickledObject` stub per name in ``objects``."""
        merged = {name: target for group in groups for name, target in group.items()}
        merged.update({name: _stub(name, PickledModule) for name in modules})
        merged.update({name: _stub(name, PickledObject) for name in objects})
        return cls(kind, types.MappingProxyType(merged))


CONTAINERS = {
    "builtins.dict": dict,
    "builtins.list": list,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.tuple": tuple,
    "collections.OrderedDict": OrderedDict,
    "collections.defaultdict": defaultdict,
    "collections.Counter": Counter,
    "_codecs.encode": _codecs_encode,
}
"""Python containers and protocol-2 ``bytes``."""

TORCH_TENSORS = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    "torch.nn.parameter.Parameter": torch.nn.Parameter,  # torch 0.4 pickles parameters as Parameter(data, grad)
    "torch.Size": torch.Size,
    "torch.device": torch.device,
    **{f"torch.{name}": dtype for name, dtype in vars(torch).items() if isinstance(dtype, torch.dtype)},
}
"""Tensor and parameter reconstruction (storages themselves are resolved by ``torch.load``)."""

NUMPY_ARRAYS = {
    f"{package}.{name}": target
    for package in ("numpy.core.multiarray", "numpy._core.multiarray")  # numpy 1.x and 2.x spellings
    for name, target in (("_reconstruct", _numpy_reconstruct), ("scalar", _numpy_scalar))
} | {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype}
"""numpy arrays, scalars and dtypes (e.g. ``np.random.get_state()`` tuples in M² checkpoints)."""

def _unpickler_module(allowlist: Allowlist) -> types.SimpleNamespace:
    """A ``pickle``-like module (``Unpickler`` + ``load``) whose ``find_class`` only answers from ``allowlist``."""

    class AllowlistUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            # Protocol ≤ 2 pickles from Python 2 / torch 0.4 spell builtins as `__builtin__` etc.; pickle's own
            # find_class applies this renaming, an override has to do it itself.
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            qualified = f"{module}.{name}"
            if qualified not in allowlist.globals:
                raise UnsafePickleError(f"refusing to load {qualified}: not an allowed class in a {allowlist.kind}")
            return allowlist.globals[qualified]

    def load(file, **kwargs):
        return AllowlistUnpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__=__name__, Unpickler=AllowlistUnpickler, load=load)


# What decoding a damaged file raises inside pickle / torch.load (zip reader, legacy storages, tar probe).
_DECODE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    RuntimeError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    struct.error,
    tarfile.TarError,
    zipfile.BadZipFile,
    OSError,
)


def _existing_file(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    return path


def load_checkpoint(path, allowlist: Allowlist) -> Any:
    """Load a ``torch.save`` file (zip or legacy container, or a bare pickle) through ``allowlist``.

    Tensors are mapped to CPU. Raises ``FileNotFoundError`` for a missing file, :class:`UnsafePickleError` for a
    global outside the allowlist, :class:`CorruptCheckpointError` for a truncated or undecodable file.
    """
    path = _existing_file(path, "checkpoint")
    corrupt = CorruptCheckpointError(f"checkpoint file is truncated or corrupt: {path}")
    with path.open("rb") as file:
        is_zip = file.read(4) == b"PK\x03\x04"
    if is_zip:
        try:
            with zipfile.ZipFile(path) as archive:
                records = [name.split("/", 1)[-1] for name in archive.namelist()]
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise corrupt from error
        # torch.load would hand a TorchScript archive to torch.jit.load, which runs the archive's code.
        if "constants.pkl" in records:
            raise UnsafePickleError(f"refusing to load {path}: it is a TorchScript archive, not a {allowlist.kind}")
    with warnings.catch_warnings():
        # The legacy container embeds the authors' class source; torch compares it with the stub's and warns.
        warnings.simplefilter("ignore", SourceChangeWarning)
        warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
        try:
            return torch.load(path, map_location="cpu", pickle_module=_unpickler_module(allowlist), weights_only=False)
        except CheckpointError:
            raise
        except _DECODE_ERRORS as error:
            raise corrupt from error


def load_pickle(path, allowlist: Allowlist) -> Any:
    """Load a plain pickle file (e.g. a vocabulary) through ``allowlist``; errors as in :func:`load_checkpoint`."""
    path = _existing_file(path, "pickle")
    try:
        with path.open("rb") as file:
            return _unpickler_module(allowlist).load(file, encoding="utf-8")
    except CheckpointError:
        raise
    except _DECODE_ERRORS as error:
        raise CorruptCheckpointError(f"pickle file is truncated or corrupt: {path}") from error
