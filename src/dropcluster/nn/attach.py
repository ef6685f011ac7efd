"""Put a regularizer after any submodule of any model, without renaming its weights.

``attach(model, "layer1.0.relu", DropCluster2d(0.1))`` makes the regularizer a child of the
named submodule (under :data:`ATTACHED_NAME`) and registers a forward hook there that returns
``regularizer(output)``. Nothing of the model moves: every existing parameter and buffer keeps
its name, so a state_dict saved before (a pretrained checkpoint) loads strictly after, as long
as the regularizer adds no state of its own or accepts a state_dict without it (DropCluster2d
before its first fit, DropBlock2d, StochasticDepth and torch's dropouts).

Wrapping the target in a new ``nn.Sequential`` would rename its weights (``relu`` becoming
``relu.0``), and editing the model's ``forward`` is not possible for a model one did not write;
the hook needs neither.

The hook is an instance of a module-level class that looks the regularizer up on the module it
is called with, not a closure over it: ``copy.deepcopy(model)`` (an EMA copy) and
``torch.save(model)`` give a model whose hook uses its own copy of the regularizer.
"""

from __future__ import annotations

import difflib
import warnings

from torch import nn

from dropcluster.compat import pickled_defaults
from dropcluster.nn.fitting import unwrap
from dropcluster.nn.ranking import LayerRanking

__all__ = [
    "ATTACHED_NAME",
    "attach",
    "detach",
]


#: The attribute of the target module that holds the attached regularizer; its persistent
#: buffers appear in the model's state_dict as ``<target>.attached_regularizer.<buffer>``.
ATTACHED_NAME = "attached_regularizer"


class _ApplyAttached:
    """Forward hook: the module's output passed through the regularizer attached to it.

    It finds the regularizer on the module it is called with, so a copied or unpickled model
    applies its own regularizer; it keeps only the target's name, for error messages.
    """

    def __init__(self, after: str = "") -> None:
        self.after = after

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        pickled_defaults(self, {"after": ""})

    def __call__(self, module: nn.Module, inputs, output):
        try:
            return module._modules[ATTACHED_NAME](output)
        except ValueError as error:
            where = f"after {self.after!r}" if self.after else "to the model's output"
            raise ValueError(
                f"the regularizer attached {where} ({type(module).__name__}): {error}"
            ) from error


def attach(model: nn.Module, after: str | LayerRanking, regularizer: nn.Module) -> nn.Module:
    """Apply ``regularizer`` to the output of the submodule named ``after``.

    The regularizer becomes the child ``ATTACHED_NAME`` of that submodule, so it follows the
    model's ``train()``/``eval()``, ``to()`` and ``state_dict``, and :func:`fit_clusters`,
    drop-rate schedules and ``named_modules()`` find it. The existing parameter and buffer
    names do not change.

    The hook runs at every call of the target. A module called several times in one forward is
    regularized at each call: torchvision's ``BasicBlock``/``Bottleneck`` use one ``relu`` for
    all their activations, so ``"layer1.0.relu"`` regularizes each of them. A DropCluster2d
    there is fitted by :func:`fit_clusters` on the output of the *first* call of each forward
    (the capture stops the forward there), and drops those clusters at every call: the calls
    must have that call's shape (a Bottleneck's do not, and its later calls then raise, naming
    the target). Attach to a module called once (``"layer1.0.bn1"``, ``"layer1.0"``) to
    regularize one place. The top-level ``relu`` of a torchvision ResNet (the stem) is called
    once. Forward hooks registered on the target before ``attach`` see its output before the
    regularizer, those registered after see it after.

    A DropCluster2d takes (N, C, H, W) feature maps: attached after a module with another
    output (a ``Linear``, the model's root), the first forward raises, naming the target.

    An ``nn.Sequential`` runs every child it holds, so the regularizer of a Sequential target
    goes on its last layer (recursively), which gives the same output: its state_dict keys are
    then ``<target>.<last>.attached_regularizer.*``.

    Attach before wrapping the model: before ``DistributedDataParallel``, which broadcasts the
    buffers it found when it was built, and before ``torch.compile``: a compiled model that has
    run does not see a hook added later to a module that had none (torch 2.13 guards on a
    module's hooks only once it has some), so attaching to a compiled model warns; call
    ``torch._dynamo.reset()`` after attaching, or compile again. A wrapped model is accepted: the
    name is looked up in the wrapped module (``"layer1"``; the wrapper's own spelling
    ``"module.layer1"`` works too).

    Args:
        model: any module, possibly compiled or wrapped in (Distributed)DataParallel.
        after: dotted name of the submodule, as ``named_modules()`` gives it (``"layer1.0.relu"``,
            ``"features.3"`` for an ``nn.Sequential`` index); or a
            :class:`~dropcluster.nn.ranking.LayerRanking` of this model (from
            :func:`~dropcluster.nn.ranking.rank_layers`), which stands for its most structured
            place, ``ranking.best``.
        regularizer: the module applied to the target's output (it must accept that output).

    Returns:
        ``regularizer`` itself.

    Raises:
        ValueError: ``after`` names no submodule (the message lists close names), the target
            has a regularizer attached already, or ``regularizer`` is not an ``nn.Module``.
    """
    if not isinstance(regularizer, nn.Module):
        raise ValueError(
            f"regularizer should be an nn.Module, but got {type(regularizer).__name__}"
        )
    if isinstance(after, LayerRanking):
        after = after.best
    after, target = _target(model, after)
    if _hook_keys(target) or ATTACHED_NAME in target._modules:
        raise ValueError(
            f"{after!r} has a regularizer attached already "
            f"({target._modules.get(ATTACHED_NAME)!r}): detach(model, {after!r}) first"
        )
    if hasattr(target, ATTACHED_NAME):
        raise ValueError(
            f"{after!r} ({type(target).__name__}) has its own attribute {ATTACHED_NAME!r}: "
            f"attach after another module"
        )
    target.add_module(ATTACHED_NAME, regularizer)
    target.register_forward_hook(_ApplyAttached(after))
    if _compiled(model):
        warnings.warn(
            f"attached after {after!r} of a model wrapped in torch.compile: a compiled graph "
            f"that has run does not see the new hook; call torch._dynamo.reset() now (or "
            f"compile the model again), or attach before compiling",
            stacklevel=2,
        )
    return regularizer


def _compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a wrapper inside it is a ``torch.compile`` wrapper."""
    while True:
        if hasattr(model, "_orig_mod"):
            return True
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return False


def detach(model: nn.Module, after: str) -> nn.Module:
    """Undo :func:`attach`: remove the hook and the regularizer from the submodule ``after``.

    The model then computes exactly what it did before ``attach``, with the same state_dict
    keys.

    Returns:
        The regularizer that was attached.

    Raises:
        ValueError: ``after`` names no submodule, or nothing is attached there.
    """
    after, target = _target(model, after)
    keys = _hook_keys(target)
    if not keys or ATTACHED_NAME not in target._modules:
        raise ValueError(f"{after!r} has no regularizer attached")
    for key in keys:
        for hooks in _hook_dicts(target):
            hooks.pop(key, None)
    return target._modules.pop(ATTACHED_NAME)


def _target(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """The submodule ``name``, or, for an ``nn.Sequential`` (which would run an added child as
    one of its layers), its last layer, which gives the same output; with its name."""
    target = _submodule(model, name)
    while isinstance(target, nn.Sequential):
        if len(target) == 0:
            raise ValueError(
                f"{name!r} is an empty nn.Sequential: there is no output to regularize"
            )
        last = list(target._modules)[-1]
        name, target = (f"{name}.{last}" if name else last), target._modules[last]
    return name, target


def _submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of the wrapped module, or of ``model`` as spelled through it."""
    if not isinstance(name, str):
        raise ValueError(f"after should be a module name (a str), but got {name!r}")
    inner = unwrap(model)
    for root in (inner, model):
        try:
            return root.get_submodule(name)
        except AttributeError:
            continue
    names = [found for found, _ in inner.named_modules() if found]
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    shown = ", ".join(close or names[:5]) or "none"
    hint = f"close names: {shown}" if close else f"its first: {shown}"
    raise ValueError(
        f"{type(inner).__name__} has no submodule {name!r} (names are those of "
        f"named_modules(); {hint})"
    )


def _hook_keys(module: nn.Module) -> list[int]:
    """Keys of the :class:`_ApplyAttached` hooks registered on ``module``."""
    return [key for key, hook in module._forward_hooks.items() if isinstance(hook, _ApplyAttached)]


def _hook_dicts(module: nn.Module) -> list[dict]:
    """The dicts a forward hook's key lives in (what ``RemovableHandle.remove`` clears)."""
    extra = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    return [module._forward_hooks] + [
        getattr(module, name) for name in extra if hasattr(module, name)
    ]
