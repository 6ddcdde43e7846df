"""A stand-in for an accelerator without float64 (Apple's MPS), for CPU-only machines.

Tensors "on" it are CPU tensors of :class:`OnAccelerator`, whose ``device`` reads ``mps``. Inside
:func:`fake_accelerator`, every torch call is checked the way the real device would refuse it:

- a float64 result on the device (MPS has no float64);
- an operation mixing device tensors with CPU tensors that are not 0-dim scalars (tensors on different devices);
- ``.numpy()`` of a device tensor (the host cannot read device memory without a copy).

``.to("mps")``, ``device="mps"`` factories and ``.cpu()`` / ``.to("cpu")`` move between the two. The check is on
the calls the code makes, not on kernels: timings and device rounding are not emulated (``input_roundoff`` of
``mps`` applies, as on the real device). ``torch.func.jvp`` strips tensor subclasses, so inside it nothing is
checked; its outputs are put back on the device.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

DEVICE = torch.device("mps")


class OnAccelerator(torch.Tensor):
    @property
    def device(self):
        return DEVICE

    @property
    def is_cuda(self):
        return False


def _is_device(arg) -> bool:
    if isinstance(arg, str):
        return arg.startswith("mps")
    return isinstance(arg, torch.device) and arg.type == "mps"


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def _refuse_float64(result):
    for r in _flat([result]):
        if isinstance(r, OnAccelerator) and r.dtype == torch.float64:
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support "
                            "float64 (fake accelerator)")
    return result


def _host(result):
    return result.as_subclass(torch.Tensor) if isinstance(result, OnAccelerator) else result


class _Mode(TorchFunctionMode):
    """Operations on device tensors run as themselves (the subclass carries its outputs, autograd included);
    only device moves, float64 results, mixed devices and host reads are handled here."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        tensors = [a for a in _flat(list(args) + list(kwargs.values())) if isinstance(a, torch.Tensor)]
        on_device = any(isinstance(t, OnAccelerator) for t in tensors)
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        if name in METADATA:
            return func(*args, **kwargs)
        if name == "numpy" and on_device:
            raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() (fake accelerator)")
        if name == "cpu" or (name == "to" and target is not None and not _is_device(target)):
            return _host(func(*args, **kwargs))
        if _is_device(target):
            kwargs = {k: ("cpu" if k == "device" else v) for k, v in kwargs.items()}
            args = tuple("cpu" if _is_device(a) else a for a in args)
            result = func(*args, **kwargs)
            return _refuse_float64(result if isinstance(result, OnAccelerator) else result.as_subclass(OnAccelerator))
        if on_device:
            mixed = [t for t in tensors if not isinstance(t, OnAccelerator) and t.dim() > 0]
            if mixed:
                raise RuntimeError(f"{name}: expected all tensors to be on the same device, got mps and cpu "
                                   f"(shapes {[tuple(t.shape) for t in mixed]}; fake accelerator)")
            return _refuse_float64(func(*args, **kwargs))
        return func(*args, **kwargs)


METADATA = {"device", "is_cuda", "shape", "dtype", "ndim", "__len__", "dim", "numel", "size", "is_floating_point",
            "element_size", "stride", "is_contiguous", "data_ptr", "requires_grad", "grad_fn", "is_leaf"}


def _jvp_keeping_the_device(jvp):
    """``torch.func.jvp`` strips tensor subclasses: run it on host views and put its outputs back on the device
    when its primals were there (the function inside is then not checked)."""
    def wrapped(func, primals, tangents, *args, **kwargs):
        on_device = any(isinstance(p, OnAccelerator) for p in _flat(list(primals) + list(tangents)))
        out = jvp(func, tuple(_host(p) for p in primals), tuple(_host(p) for p in tangents), *args, **kwargs)
        return _to_device_all(out) if on_device else out
    return wrapped


def _to_device_all(value):
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device_all(v) for v in value)
    return _refuse_float64(value.as_subclass(OnAccelerator)) if isinstance(value, torch.Tensor) else value


@contextlib.contextmanager
def fake_accelerator():
    """Check every torch call inside the block as an MPS device would (see the module docstring)."""
    jvp = torch.func.jvp
    torch.func.jvp = _jvp_keeping_the_device(jvp)
    try:
        with _Mode():
            yield DEVICE
    finally:
        torch.func.jvp = jvp


def to_device(t: torch.Tensor) -> OnAccelerator:
    """A CPU tensor as one on the fake accelerator (float64 refused)."""
    if t.dtype == torch.float64:
        raise TypeError("MPS has no float64")
    return t.as_subclass(OnAccelerator)
