"""The only place that touches torch hooks or module forwards.

Hooks are global state on the module objects, so every registration lives inside a context manager that
validates all targets first, registers inside ``try`` and removes every handle in ``finally`` — also when a
hook or the forward raises, and when contexts are nested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import RolevecError

#: Maps the residual tensor to a new one (or None to leave it unchanged).
TensorFn = Callable[[torch.Tensor], torch.Tensor | None]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once everything needed has been read."""


def _hidden_from_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise RolevecError(
        "could not find the residual tensor in a module call (neither the first positional argument "
        "nor `hidden_states=`); pass block_pattern= to point rolevec at the decoder blocks"
    )


def _replace_hidden_in_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], new: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args and isinstance(args[0], torch.Tensor):
        return (new, *args[1:]), kwargs
    out = dict(kwargs)
    out["hidden_states"] = new
    return args, out


def _hidden_from_output(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise RolevecError(f"module output of type {type(output).__name__} holds no residual tensor")


def _replace_hidden_in_output(output: Any, new: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def input_hook(fn: TensorFn) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]:
    """Wrap a tensor function as a forward pre-hook (with kwargs) acting on the module's residual input."""

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        new = fn(_hidden_from_call(args, kwargs))
        if new is None:
            return None
        return _replace_hidden_in_call(args, kwargs, new)

    return hook


def output_hook(fn: TensorFn) -> Callable[[nn.Module, tuple[Any, ...], Any], Any]:
    """Wrap a tensor function as a forward hook acting on the module's (first) output tensor."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        new = fn(_hidden_from_output(output))
        if new is None:
            return None
        return _replace_hidden_in_output(output, new)

    return hook


def _marked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a hook so rolevec's own hooks can be told from others (transformers keeps some of its own)."""

    def hook(*args: Any) -> Any:
        return fn(*args)

    hook._rolevec_hook = True  # type: ignore[attr-defined]
    return hook


PreHook = Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], Any]
PostHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


@contextmanager
def hooked(
    *,
    pre: Sequence[tuple[nn.Module, PreHook]] = (),
    post: Sequence[tuple[nn.Module, PostHook]] = (),
) -> Iterator[None]:
    """Register forward pre-hooks (called with kwargs) and forward hooks for the duration of the block."""
    for module, fn in [*pre, *post]:
        if not isinstance(module, nn.Module):
            raise RolevecError(f"hook target {module!r} is not a torch module")
        if not callable(fn):
            raise RolevecError(f"hook {fn!r} is not callable")
    handles: list[RemovableHandle] = []
    try:
        for module, pre_fn in pre:
            handles.append(module.register_forward_pre_hook(_marked(pre_fn), with_kwargs=True))
        for module, post_fn in post:
            handles.append(module.register_forward_hook(_marked(post_fn)))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


def _passthrough(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _hidden_from_call(args, kwargs)


@contextmanager
def skipped(blocks: Sequence[nn.Module]) -> Iterator[None]:
    """Make the given blocks return their residual input unchanged, so a forward can resume mid-stack.

    Used with a pre-hook on the first block that still runs, which puts the cached residual in place.
    The blocks' own ``forward`` is restored on exit, whatever happens. Under a device map accelerate has
    already wrapped each block's ``forward`` (its hook moves inputs and offloaded weights in); that wrapper
    is set aside too, so a skipped block loads nothing, and is put back as it was.
    """
    for block in blocks:
        if not isinstance(block, nn.Module):
            raise RolevecError(f"cannot skip {block!r}: not a torch module")
        if vars(block).get("forward") is _passthrough:
            raise RolevecError("a block's forward is already replaced; nested skipping is not supported")
    patched: list[tuple[nn.Module, Any]] = []
    try:
        for block in blocks:
            patched.append((block, vars(block).get("forward")))
            block.forward = _passthrough  # type: ignore[method-assign]
        yield
    finally:
        for block, own in patched:
            if own is None:
                del block.forward
            else:
                block.forward = own  # type: ignore[method-assign]


@contextmanager
def onloaded(module: nn.Module) -> Iterator[None]:
    """The weights of ``module`` on its execution device for the block, where accelerate offloaded them
    (to disk or CPU memory, leaving meta tensors), and offloaded again after, also on error. Reading a
    weight outside a forward (the letter head reads four rows of the unembedding) needs this."""
    hook = getattr(module, "_hf_hook", None)
    parts = getattr(hook, "hooks", (hook,))  # accelerate's SequentialHook holds several
    if hook is None or not any(getattr(h, "offload", False) for h in parts):
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


def count_hooks(model: nn.Module) -> int:
    """rolevec's hooks and replaced forwards on every submodule: zero whenever no rolevec context is open.

    Hooks that transformers installs for itself (e.g. to record ``output_hidden_states``) are not counted.
    """
    total = 0
    for module in model.modules():
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        total += sum(1 for h in hooks if getattr(h, "_rolevec_hook", False))
        total += int(vars(module).get("forward") is _passthrough)
    return total
