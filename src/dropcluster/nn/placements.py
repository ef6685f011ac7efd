"""The paper's placements on any model: DropCluster, DropBlock, Dropout, StochasticDepth.

The DropCluster paper puts DropCluster after the first conv layer's activation (15 clusters),
DropBlock after chosen groups of blocks, Dropout and SpatialDropout before the head, and
StochasticDepth on every residual branch. These helpers find those places by module structure
and install the layer there:

- this project's models (anything with ``slots`` and ``set_regularizer``, e.g.
  ``dropcluster.models.resnet50``): the slots ``"stem"``, ``"group<k>"``, ``"group4_inner"``
  (the paper's Dropout place: in every block of the last group, before the head) and
  ``"residual"``, through the model's ``set_regularizer`` (and its ``resolve_slot`` aliases);
- torchvision's and timm's ResNets (``conv1``/``bn1`` then ``relu`` or ``act1``,
  ``layer1``...``layer4``, blocks with ``conv1``/``bn1``/``conv2``/``bn2`` and a ``downsample``
  attribute): through :func:`dropcluster.nn.attach`, which renames no weight, so pretrained
  checkpoints load strictly; StochasticDepth goes in timm's ``drop_path`` place of each block;
- any other model: the module names given (``after=``, ``stages=``, ``branches=``).

Every helper returns ``{name: module}`` for what it installed, in forward order, with names as
``named_modules()`` of the (unwrapped) model gives them. It builds every module before it
changes the model and undoes its own attachments when one fails, so an error leaves the model
as it was. Errors are one line naming what was looked for and what the model has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from dropcluster.nn.attach import attach, detach
from dropcluster.nn.drop_rate import check_drop_rate
from dropcluster.nn.dropblock import DropBlock2d
from dropcluster.nn.dropcluster import DropCluster2d
from dropcluster.nn.fitting import unwrap
from dropcluster.nn.stochastic_depth import StochasticDepth
from dropcluster.validation import check_choice

__all__ = [
    "DEPTH_RULES",
    "place_dropblock",
    "place_dropcluster",
    "place_dropout",
    "place_stochastic_depth",
]


#: StochasticDepth's rate rules: ``"constant"`` (the DropCluster paper: every branch rate p)
#: and ``"linear"`` (Huang et al. 2016: block l of L, from 1, gets ``p * l / L``).
DEPTH_RULES = ("constant", "linear")

# Top-level stem activations by layout: (name of the activation, layout), after conv + bn1.
_STEM_ACTIVATIONS = (("relu", "torchvision ResNet"), ("act1", "timm ResNet"))
_STEM_CONVS = ("conv1", "conv_stem")


def place_dropcluster(
    model: nn.Module, p: float, *, after: str | None = None, n_clusters: int = 15, **options: Any
) -> dict[str, nn.Module]:
    """Put a :class:`DropCluster2d` after the stem's activation (the first conv layer's
    activations), as the paper does, or after the module (slot) ``after``.

    Found: a model with slots, its ``"stem"`` slot; a torchvision ResNet, the top-level
    ``relu`` (called once, in the stem: the blocks have their own); a timm ResNet, ``act1``.
    The layer is the identity until fitted (:func:`dropcluster.nn.fit_clusters`).

    Args:
        model: any module (possibly compiled or wrapped in DistributedDataParallel).
        p: fraction of each structured channel's clusters dropped, in [0, 1).
        after: a module name (``named_modules()``), or a slot name on a model with slots.
        n_clusters: clusters per channel (the paper's 15).
        **options: further :class:`DropCluster2d` arguments (``input_shape``, ``per_sample``...).

    Returns:
        ``{name: layer}`` with the one layer placed.

    Raises:
        ValueError: no stem activation found and no ``after`` given, an unknown name, a place
            that has a regularizer already, or bad p or options.
    """
    inner = unwrap(model)
    if _has_slots(inner):
        return _fill_slots(
            inner,
            [after or "stem"],
            lambda places: [DropCluster2d(p, n_clusters, **options) for _ in range(places)],
        )
    layer = DropCluster2d(p, n_clusters, **options)
    return _attach_all(model, [(after if after is not None else _stem_activation(inner), layer)])


def place_dropblock(
    model: nn.Module,
    p: float,
    *,
    stages: int | str | Sequence[int | str] = (3, 4),
    block_size: int = 7,
    **options: Any,
) -> dict[str, nn.Module]:
    """Put a :class:`DropBlock2d` after each chosen stage (group of residual blocks).

    The default is the DropBlock paper's ImageNet ResNet-50 setting: after groups 3 and 4, 7x7
    blocks (the DropCluster paper: 5x5 after group 1 on CIFAR-100, 7x7 after group 4 on Tiny
    ImageNet). Each stage gets its own layer.

    Args:
        model: any module (possibly compiled or wrapped in DistributedDataParallel).
        p: fraction of pixels dropped, in [0, 1).
        stages: stage numbers from 1 (``layer<k>`` on torchvision and timm ResNets, slot
            ``group<k>`` on a model with slots, where ``group4`` maps to a 3-group model's last
            group), or module names (slot names on a model with slots), or a list of them.
        block_size: block side, clamped to the map (the paper's b).
        **options: further :class:`DropBlock2d` arguments (``per_channel``, ``mode``...).

    Returns:
        ``{name: layer}``, one per stage, in forward order.

    Raises:
        ValueError: a stage the model does not have, bad ``stages``, a place that has a
            regularizer already, or bad p or options.
    """
    wanted = _stage_list(stages)
    inner = unwrap(model)
    if _has_slots(inner):
        names = [f"group{stage}" if isinstance(stage, int) else stage for stage in wanted]
        return _fill_slots(
            inner,
            names,
            lambda places: [DropBlock2d(p, block_size, **options) for _ in range(places)],
        )
    names = list(dict.fromkeys(_stage_name(inner, stage) for stage in wanted))
    return _attach_all(model, [(name, DropBlock2d(p, block_size, **options)) for name in names])


def place_dropout(
    model: nn.Module, p: float, *, spatial: bool = False, after: str | None = None
) -> dict[str, nn.Module]:
    """Put ``nn.Dropout(p)`` (``spatial``: ``nn.Dropout2d(p)``, whole channels) before the head.

    Found: a model with slots, its ``"group4_inner"`` slot (the paper's: in every block of the
    fourth group, after its 3x3 conv; a 3-group model's last group); a torchvision or timm
    ResNet, after its last stage (``layer4``: the global pool's input). timm's own
    ``drop_rate`` drops the pooled features instead: ``after="global_pool"`` (timm) or
    ``after="avgpool"`` (torchvision) does that.

    Args:
        model: any module (possibly compiled or wrapped in DistributedDataParallel).
        p: drop rate in [0, 1).
        spatial: drop whole channels (SpatialDropout, ``nn.Dropout2d``: needs (N, C, H, W)).
        after: a module name, or a slot name on a model with slots.

    Returns:
        ``{name: layer}`` for the layers placed (one per block of a per-block slot).

    Raises:
        ValueError: no last stage found and no ``after`` given, an unknown name, a place that
            has a regularizer already, or a bad p.
    """
    check_drop_rate(p)
    kind = nn.Dropout2d if spatial else nn.Dropout
    inner = unwrap(model)
    if _has_slots(inner):
        return _fill_slots(
            inner, [after or "group4_inner"], lambda places: [kind(p) for _ in range(places)]
        )
    if after is None:
        stages = _stages(inner)
        if not stages:
            raise ValueError(_not_found(inner, "place_dropout", "a last stage", "after"))
        after = stages[-1]
    return _attach_all(model, [(after, kind(p))])


def place_stochastic_depth(
    model: nn.Module,
    p: float,
    *,
    rule: str = "constant",
    branches: Sequence[str] | None = None,
    **options: Any,
) -> dict[str, nn.Module]:
    """Put a :class:`StochasticDepth` on every residual branch, never on an identity path.

    A residual block computes ``act(shortcut(x) + branch(x))``; the layer goes on
    ``branch(x)`` before the addition, so with the branch dropped the block computes
    ``act(shortcut(x))``. Found:

    - a model with slots: its ``"residual"`` slot, in every block;
    - a torchvision ResNet's ``BasicBlock``/``Bottleneck``: attached after the block's last
      BN (``bn2``/``bn3``), whose output is the branch alone (the block then adds the
      shortcut, ``downsample(x)`` or x, and applies its ReLU);
    - a timm ResNet's blocks: installed as the block's ``drop_path`` (None there when the
      model was built without ``drop_path_rate``), which timm applies to the branch after its
      last BN and attention (``se``) module, before the addition.

    Blocks count in ``named_modules()`` order (forward order for these layouts).

    Args:
        model: any module (possibly compiled or wrapped in DistributedDataParallel).
        p: drop rate in [0, 1] (of every branch, ``"constant"``; of the last, ``"linear"``).
        rule: ``"constant"`` (the DropCluster paper) or ``"linear"``: block l of L (l from 1)
            gets ``p * l / L`` (Huang et al. 2016). timm's ``drop_path_rate`` spaces its rates
            from 0 (first block) to p (last): ``p * (l - 1) / (L - 1)``.
        branches: names of modules whose output is a residual branch alone (before the add),
            one per block, in forward order: for models whose blocks are not found.
        **options: further :class:`StochasticDepth` arguments (``mode="batch"``, ``generator``).

    Returns:
        ``{name: layer}``, one per block, in forward order.

    Raises:
        ValueError: no residual block found and no ``branches`` given, a timm block that has
            a drop path already, a block with a module after its last BN, a place that has a
            regularizer already, or a bad p, rule or options.
    """
    check_drop_rate(p, allow_one=True)
    check_choice("rule", rule, DEPTH_RULES)
    inner = unwrap(model)
    if _has_slots(inner) and branches is None:
        if "residual" not in inner.slots:
            raise ValueError(_not_found(inner, "place_stochastic_depth", "a slot 'residual'"))
        return _fill_slots(
            inner,
            ["residual"],
            lambda places: [StochasticDepth(rate, **options) for rate in _rates(p, rule, places)],
        )
    if branches is not None:
        names = _name_list("branches", branches)
        places = [(name, "attach") for name in names]
    else:
        places = _branch_places(inner)
    layers = [StochasticDepth(rate, **options) for rate in _rates(p, rule, len(places))]
    paired = list(zip(places, layers, strict=True))
    _attach_all(model, [(name, layer) for (name, how), layer in paired if how == "attach"])
    for (name, how), layer in paired:
        if how == "drop_path":  # checked empty by _branch_places: this cannot fail
            inner.get_submodule(name.rpartition(".")[0]).drop_path = layer
    return _names_of(inner, layers)


def _rates(p: float, rule: str, count: int) -> list[float]:
    if rule == "linear":
        return [p * (index + 1) / count for index in range(count)]
    return [p] * count


def _has_slots(model: nn.Module) -> bool:
    """Whether ``model`` is one of this project's slotted models (duck-typed: the core does
    not import :mod:`dropcluster.models`)."""
    return callable(getattr(model, "set_regularizer", None)) and callable(
        getattr(model, "resolve_slot", None)
    )


def _fill_slots(
    model: nn.Module, names: list[str], build: Callable[[int], list[nn.Module]]
) -> dict[str, nn.Module]:
    """Install ``build(places)`` (one module per place, forward order) in each slot ``names``;
    every module is built before any slot changes."""
    resolved = list(dict.fromkeys(model.resolve_slot(name) for name in names))
    built = [build(len(model.slots[name])) for name in resolved]
    for name, modules in zip(resolved, built, strict=True):
        model.set_regularizer(name, iter(modules).__next__)
    return _names_of(model, [module for modules in built for module in modules])


def _attach_all(model: nn.Module, places: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """Attach each layer after its module; on a failure, detach those attached and re-raise."""
    done = []
    try:
        for name, layer in places:
            attach(model, name, layer)
            done.append(name)
    except ValueError:
        for name in reversed(done):
            detach(model, name)
        raise
    return _names_of(unwrap(model), [layer for _, layer in places])


def _names_of(model: nn.Module, modules: list[nn.Module]) -> dict[str, nn.Module]:
    """``{name in model: module}`` for ``modules``, in their order."""
    names = {id(module): name for name, module in model.named_modules()}
    return {names[id(module)]: module for module in modules}


def _top_level(model: nn.Module) -> str:
    return ", ".join(model._modules) or "none"


def _not_found(model: nn.Module, helper: str, looked_for: str, argument: str = "") -> str:
    hint = f"; name the place with {argument}=" if argument else ""
    return (
        f"{helper} found no place in {type(model).__name__}: it looked for {looked_for}; the "
        f"model's top-level modules are {_top_level(model)}{hint}"
    )


def _stem_activation(model: nn.Module) -> str:
    """The top-level stem activation of a torchvision or timm ResNet layout."""
    children = model._modules
    if "bn1" in children and any(conv in children for conv in _STEM_CONVS):
        for name, _ in _STEM_ACTIVATIONS:
            if name in children:
                return name
    layouts = " or ".join(f"{name!r} ({layout})" for name, layout in _STEM_ACTIVATIONS)
    looked_for = f"a top-level {layouts} after 'bn1' and 'conv1' or 'conv_stem'"
    raise ValueError(_not_found(model, "place_dropcluster", looked_for, "after"))


def _stages(model: nn.Module) -> list[str]:
    """The top-level ``layer1``, ``layer2``, ... of a torchvision or timm ResNet, in order."""
    names = []
    while f"layer{len(names) + 1}" in model._modules:
        names.append(f"layer{len(names) + 1}")
    return names


def _stage_list(stages: int | str | Sequence[int | str]) -> list[int | str]:
    wanted = [stages] if isinstance(stages, (int, str)) else list(stages)
    if not wanted or not all(
        (isinstance(stage, int) and not isinstance(stage, bool) and stage >= 1)
        or isinstance(stage, str)
        for stage in wanted
    ):
        raise ValueError(
            f"stages should be stage numbers from 1 or module names (one or a non-empty list), "
            f"but got {stages!r}"
        )
    return wanted


def _stage_name(model: nn.Module, stage: int | str) -> str:
    if isinstance(stage, str):
        return stage
    stages = _stages(model)
    if stage <= len(stages):
        return stages[stage - 1]
    if not stages:
        raise ValueError(
            _not_found(model, "place_dropblock", f"a top-level 'layer{stage}'", "stages")
        )
    raise ValueError(
        f"place_dropblock: {type(model).__name__} has no stage {stage} ('layer{stage}'); its "
        f"stages are {', '.join(stages)}"
    )


def _name_list(argument: str, names: Sequence[str]) -> list[str]:
    found = [names] if isinstance(names, str) else list(names)
    if not found or not all(isinstance(name, str) for name in found):
        raise ValueError(
            f"{argument} should be a module name or a non-empty list of them, but got {names!r}"
        )
    return found


def _is_resnet_block(module: nn.Module) -> bool:
    """torchvision's and timm's BasicBlock/Bottleneck: conv1, bn1, conv2, bn2 and a
    ``downsample`` attribute (a module or None)."""
    children = module._modules
    return hasattr(module, "downsample") and all(
        name in children for name in ("conv1", "bn1", "conv2", "bn2")
    )


def _branch_places(model: nn.Module) -> list[tuple[str, str]]:
    """(name, how) of the residual branch's end in every block: a timm block's ``drop_path``
    (how ``"drop_path"``) or a torchvision block's last BN (how ``"attach"``)."""
    places = []
    for name, module in model.named_modules():
        if not _is_resnet_block(module):
            continue
        prefix = f"{name}." if name else ""
        if hasattr(module, "drop_path"):  # timm: its own place for stochastic depth
            current = module.drop_path
            if current is not None and not isinstance(current, nn.Identity):
                raise ValueError(
                    f"place_stochastic_depth: {prefix}drop_path is {type(current).__name__} "
                    f"already (a timm model built with drop_path_rate > 0): build it with "
                    f"drop_path_rate=0 to place StochasticDepth"
                )
            places.append((f"{prefix}drop_path", "drop_path"))
            continue
        last = "bn3" if "conv3" in module._modules and "bn3" in module._modules else "bn2"
        extra = getattr(module, "se", None)
        if extra is not None and not isinstance(extra, nn.Identity):
            raise ValueError(
                f"place_stochastic_depth: block {name!r} ({type(module).__name__}) has an 'se' "
                f"module after its last BN {last!r}: pass branches= with the modules whose "
                f"output is each residual branch before the addition"
            )
        places.append((f"{prefix}{last}", "attach"))
    if not places:
        raise ValueError(
            _not_found(
                model,
                "place_stochastic_depth",
                "residual blocks (modules with conv1, bn1, conv2, bn2 and a downsample "
                "attribute, as torchvision's and timm's ResNet blocks) or a slot 'residual'",
                "branches",
            )
        )
    return places
