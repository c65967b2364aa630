"""Higher-order gradients through the fused ops' autograd Functions.

A backward that runs kernels returns gradients without an autograd graph. Under
``create_graph=True`` (autograd runs a backward with grad mode on exactly then) such gradients
would silently drop every second-order term: a gradient penalty or a Hessian-vector product would
come out wrong with no error. So each fused Function checks for it at the top of its backward:

- ops with a differentiable twin (the factored torch path or the literal reference) recompute
  their forward with it from the saved inputs and differentiate that with ``create_graph=True``:
  the same math, with a graph, at the twin's cost (only for higher-order use);
- ops whose saved inputs are kernel-specific layouts refuse with an error that names the way out.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def create_graph_requested() -> bool:
    """True inside a backward run with ``create_graph=True`` (autograd enables grad mode exactly then)."""
    return torch.is_grad_enabled()


def recompute_grads(twin: Callable[..., torch.Tensor], inputs: Sequence[Optional[torch.Tensor]],
                    needs: Sequence[bool], grad: torch.Tensor) -> List[Optional[torch.Tensor]]:
    """Gradients of ``twin(*inputs)`` (weighted by ``grad``) for each input flagged in ``needs``, with
    their graph kept; None for the others. An input the output does not depend on gets zeros."""
    out = twin(*inputs)
    wanted = [i for i, (t, need) in enumerate(zip(inputs, needs)) if need and t is not None and t.requires_grad]
    result: List[Optional[torch.Tensor]] = [None] * len(inputs)
    if not wanted:
        return result
    grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, create_graph=True, allow_unused=True)
    for i, g in zip(wanted, grads):
        result[i] = g if g is not None else torch.zeros_like(inputs[i])
    return result


def refuse(op: str, backend: str) -> None:
    raise RuntimeError(
        f"{op} (backend {backend!r}): higher-order gradients (create_graph=True) are not supported by the "
        f"fused backward, whose gradients carry no autograd graph; use backend='torch' (or 'reference') for "
        f"gradient penalties and other second-order terms")
