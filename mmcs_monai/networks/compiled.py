"""A compiled inference forward for CPnet: ``torch.compile`` (inductor), once per process and network.

:func:`compiled_forward` returns a callable that runs the network compiled, or None where compiling is
impossible, so the caller runs the network as it is; the reason is logged once per process (one line).
:class:`~mmcs_monai.inference.CellInferer` is its only caller: ``CellInferer(compile=True)``,
``--compile True`` on the command line, ``compile`` in the bundle configs.

How it is compiled (``benchmarks/README.md`` has the measurements behind each choice):

- inductor with weight **freezing**: parameters become constants, so batch norm and the additions after a
  convolution fold into it and convolution weights are packed once for oneDNN. Full CPnet, batch of 8 tiles
  of 224 px on a 2-core AVX2 CPU (AMD EPYC, fp32): 2.07x faster than eager with freezing, 1.80x without
  (``python -m benchmarks.compile``); where bf16 is emulated (no AVX-512 BF16) compiling gains almost
  nothing (1.07x), which is why ``precision auto`` keeps fp32 there.
  Frozen weights are copies: when the network's weights change (training, ``load_state_dict``) the next call
  notices (parameter versions and storages are checked on every call, a few microseconds) and recompiles.
- **dynamic shapes** without duck sizing: one graph serves every tile size (multiples of 16) and every batch
  of 2 to 15 tiles, so a short last batch or a smaller tile never recompiles. A batch of one tile runs
  eagerly: PyTorch would compile a second graph for it (size 1 is specialised), at the cost of the first.
  Each compiled network has its own graph cache (see :func:`_own_forward`), kept as long as the network.
- compiled code is cached on disk by PyTorch (``TORCHINDUCTOR_CACHE_DIR``, default
  ``/tmp/torchinductor_<user>``): the C++ kernels of a second run load from there; inductor's FX graph cache
  cannot store frozen oneDNN weights (PyTorch skips it for such graphs), so each process still traces and
  freezes the network once (90-130 s for the full CPnet on 2 cores; see the benchmarks).

Fallbacks (the network runs eagerly; one log line each, once per process): a TorchScript model, a network
in training mode, a Python or platform where ``torch.compile`` is unsupported, and any error while compiling
at the first call (no C++ compiler, no Triton on a GPU, an unsupported CPU or operator).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

from mmcs_monai.reporting import OnceLog

__all__ = ["CompiledNetwork", "compile_unavailable", "compiled_forward", "reset_notes"]

logger = logging.getLogger(__name__)

# inductor's weight freezing (see the module docstring); a module setting so the benchmarks can compare
FREEZE_WEIGHTS = True

# the attribute of a network under which its compiled forms are kept (a plain object, not a submodule:
# state dicts, ``parameters()`` and ``.to()`` never see it; copying or pickling the network drops it)
_ATTRIBUTE = "_mmcs_compiled"

# why compiling is off, logged once per process and reason
_note = OnceLog(logger, "compile: %s; running the network without compiling")


def reset_notes() -> None:
    """Forget which fallbacks were logged (tests)."""
    _note.reset()


def compile_unavailable(network: torch.nn.Module | None = None, device: torch.device | str = "cpu") -> str | None:
    """Why ``network`` cannot be compiled on ``device``, or None when it can be tried."""
    if isinstance(network, torch.jit.ScriptModule):
        return "a TorchScript model is already compiled by TorchScript"
    if network is not None and network.training:
        return "the network is in training mode (compiled inference needs eval mode)"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python or platform"
    except Exception as err:  # noqa: BLE001 (any failure here means: not available)
        return f"torch.compile is unavailable ({type(err).__name__}: {err})"
    if torch.device(device).type == "cuda":
        try:
            from torch.utils._triton import has_triton

            if not has_triton():
                return "compiling for a GPU needs Triton, which is not installed"
        except ImportError:
            return "compiling for a GPU needs Triton, which is not installed"
    return None


def _own_forward(network: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``lambda x: network(x)`` with a code object of its own.

    Dynamo keeps compiled graphs per code object, and every CPnet shares ``CPnet.forward``'s: a graph frozen
    for one network, precision or set of weights would be offered to the others and, as its guards do not
    look at weight values, could be taken for another network's. A fresh code object per compiled network
    gives each its own cache, dropped with it, and its own recompile limit; new weights then recompile
    that network alone.
    """
    namespace = {"network": network}
    exec("def forward(x):\n    return network(x)\n", namespace)  # noqa: S102 (a fixed string: a new code object)
    return namespace["forward"]


def _weights_key(network: torch.nn.Module) -> tuple:
    """Identity and version of every parameter and buffer: changes whenever the weights do."""
    tensors = list(network.parameters()) + list(network.buffers())
    return tuple((t.data_ptr(), t._version) for t in tensors)


class _Compiled:
    """What a network carries under :data:`_ATTRIBUTE`: its compiled forms by key. Dropped by copies and
    pickles (a copied network compiles anew), so a network stays copyable and savable."""

    def __init__(self) -> None:
        self.entries: dict[tuple, CompiledNetwork] = {}

    def __deepcopy__(self, memo):
        return _Compiled()

    def __reduce__(self):
        return (_Compiled, ())


class CompiledNetwork:
    """``network`` compiled by inductor for inference: call it like the network, under ``torch.no_grad()``
    and the autocast of its precision (as :class:`~mmcs_monai.inference.CellInferer` does).

    Args:
        network: the network, in eval mode.
        channels_last: the memory layout inputs are given in (made so before every call, so the compiled
            graph always sees the same strides).
        freezing: inductor weight freezing (default :data:`FREEZE_WEIGHTS`).

    Attributes:
        failed: compiling failed; calls run the network eagerly.
        compiles: how many times the weights were frozen into a fresh compile (1 unless they changed).
    """

    def __init__(self, network: torch.nn.Module, channels_last: bool = False, freezing: bool | None = None):
        self.network = network
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.freezing = FREEZE_WEIGHTS if freezing is None else bool(freezing)
        self.failed = False
        self.compiles = 0
        self._module = None
        self._weights = None

    def _configured(self):
        """The settings every compile of this network runs under: freezing, and no duck sizing (a square
        first tile would otherwise tie H to W and recompile on the first non-square one)."""
        import torch._inductor.config as inductor_config
        import torch.fx.experimental._config as fx_config

        stack = contextlib.ExitStack()
        stack.enter_context(inductor_config.patch(freezing=self.freezing))
        stack.enter_context(fx_config.patch(use_duck_shape=False))
        return stack

    def _compiled_module(self):
        weights = _weights_key(self.network)
        if self._module is not None and weights != self._weights:
            # frozen weights are copies, which dynamo's guards do not compare: compile this network again
            logger.info("compile: the network's weights changed; compiling it again")
            self._module = None
        if self._module is None:
            self._module = torch.compile(_own_forward(self.network), dynamic=True)
            self._weights = weights
            self.compiles += 1
        return self._module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=self.memory_format)
        if self.failed or x.shape[0] < 2:
            # a batch of one tile runs eagerly: PyTorch would compile a second graph for it (size 1 is
            # specialised), which costs as much as the first; such calls are rare and small
            return self.network(x)
        try:
            with self._configured():
                return self._compiled_module()(x)
        except Exception as err:  # noqa: BLE001 (compiling can fail in many ways; eager is always right)
            out = self.network(x)  # a real error of the input or network raises here, as without compiling
            self.failed = True
            first = (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]
            _note(f"compiling failed ({type(err).__name__}: {first})")
            return out


def compiled_forward(
    network: torch.nn.Module, device: torch.device | str, precision: str = "fp32", channels_last: bool = False
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The compiled forward of ``network`` for this device, precision and layout, or None (logged once)
    where it cannot be compiled; see the module docstring.

    The same network, device, precision and layout always get the same :class:`CompiledNetwork`, so a
    process compiles each once, whichever inferer asks.
    """
    reason = compile_unavailable(network, device)
    if reason is not None:
        _note(reason)
        return None
    store = network.__dict__.get(_ATTRIBUTE)
    if not isinstance(store, _Compiled):
        store = _Compiled()
        object.__setattr__(network, _ATTRIBUTE, store)
    key = (str(torch.device(device)), precision, bool(channels_last), FREEZE_WEIGHTS)
    entry = store.entries.get(key)
    if entry is None:
        entry = store.entries[key] = CompiledNetwork(network, channels_last=channels_last)
    return None if entry.failed else entry
