"""Named places in a model where a regularizer goes, so experiments place them by name.

A :class:`Slot` is an ``nn.Module`` that holds one regularizer (``nn.Identity`` by default) and
applies it; a model built from :class:`SlottedModel` finds its slots by name. Some names stand
for one place (``"stem"``, ``"group1"``), others for one place in every block (``"residual"``,
``"group4_inner"``): each block then owns its own regularizer module.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor, nn

__all__ = [
    "Slot",
    "SlottedModel",
]


RegularizerSpec = nn.Module | Callable[[], nn.Module] | None


class Slot(nn.Module):
    """A place for a regularizer: ``forward(x) = regularizer(x)``.

    Its forward input is exactly the activation the regularizer sees, so a forward pre-hook on
    the slot (or on the regularizer in it) captures the activations to fit DropCluster on.

    Args:
        name: the slot's name, shared by the slots of every block for per-block names.

    Shape:
        input any tensor; output the regularizer's output (the input itself by default).
    """

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.regularizer: nn.Module = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.regularizer(x)

    @property
    def is_empty(self) -> bool:
        """True while the slot holds ``nn.Identity`` (no regularizer)."""
        return isinstance(self.regularizer, nn.Identity)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class SlottedModel(nn.Module):
    """Base of the models: finds :class:`Slot` modules by name and installs regularizers.

    Subclasses create their ``Slot`` modules; ``slot_aliases`` maps the paper's slot names a
    model lacks to its own equivalent (read by :func:`dropcluster.models.place_regularizer`,
    never by :meth:`set_regularizer`, which accepts only the model's own names).
    """

    #: Paper slot name -> this model's slot name, for names this model does not have.
    slot_aliases: Mapping[str, str] = MappingProxyType({})

    @property
    def slots(self) -> dict[str, tuple[Slot, ...]]:
        """Slot name -> its slots in forward order (one for ``"stem"``, one per block for
        per-block names such as ``"residual"``). Read from the module tree on each access."""
        found: dict[str, list[Slot]] = {}
        for module in self.modules():
            if isinstance(module, Slot):
                found.setdefault(module.name, []).append(module)
        return {name: tuple(slots) for name, slots in found.items()}

    def slot(self, name: str) -> Slot:
        """The single slot called ``name`` (e.g. ``model.slot("stem")`` to hook its input).

        Raises:
            ValueError: unknown name, or a per-block name (use :attr:`slots`).
        """
        slots = self._slots_named(name)
        if len(slots) != 1:
            raise ValueError(f"slot {name!r} has {len(slots)} places (one per block); use slots")
        return slots[0]

    def resolve_slot(self, name: str) -> str:
        """This model's name for the paper's slot ``name``: itself, or its alias.

        Raises:
            ValueError: neither a slot of this model nor an alias (lists the valid slots).
        """
        slots = self.slots
        if name in slots:
            return name
        if self.slot_aliases.get(name) in slots:
            return self.slot_aliases[name]
        raise ValueError(
            f"unknown slot {name!r} for {type(self).__name__}; valid slots are {', '.join(slots)}"
        )

    def set_regularizer(self, name: str, regularizer: RegularizerSpec) -> list[nn.Module]:
        """Install a regularizer in every place of slot ``name``.

        Args:
            name: a key of :attr:`slots`.
            regularizer: a module, a zero-argument factory, or None (back to ``nn.Identity``).
                A factory is called once per place, in forward order (so a per-block rate rule
                can hand out a different rate to each call). A module goes in the first place
                and a deep copy of it in each other one: every block owns its module. The
                copies share the module's ``torch.Generator`` (a copied generator would repeat
                the same random draws in every block).

        Returns:
            The installed modules, in forward order.

        Raises:
            ValueError: unknown slot name (the message lists the valid ones), or a factory
                that returned the same module twice.
            TypeError: ``regularizer`` (or what the factory returned) is not a module.
        """
        slots = self._slots_named(name)
        if regularizer is None:
            modules = [nn.Identity() for _ in slots]
        elif isinstance(regularizer, nn.Module):
            modules = [regularizer] + [_copy_sharing_generators(regularizer) for _ in slots[1:]]
        elif callable(regularizer):
            modules = [regularizer() for _ in slots]
            for module in modules:
                if not isinstance(module, nn.Module):
                    raise TypeError(
                        f"the factory for slot {name!r} should return an nn.Module, but "
                        f"returned {type(module).__name__}"
                    )
            if len({id(module) for module in modules}) != len(modules):
                raise ValueError(
                    f"the factory for slot {name!r} returned the same module for several "
                    f"blocks; it should build a new module on each call"
                )
        else:
            raise TypeError(
                f"regularizer should be an nn.Module, a zero-argument callable or None, but got "
                f"{type(regularizer).__name__}"
            )
        for slot, module in zip(slots, modules, strict=True):
            slot.regularizer = module
        return modules

    def slot_modules(self, name: str | None = None) -> list[nn.Module]:
        """The regularizers installed (not ``nn.Identity``), in slot ``name`` or in every slot.

        ``[m for m in model.slot_modules("stem") if isinstance(m, DropCluster2d)]`` finds the
        DropCluster layer to fit; its forward input is the first conv layer's activations
        (after the stem's batch norm and ReLU).
        """
        slots = self._slots_named(name) if name is not None else self._all_slots()
        return [slot.regularizer for slot in slots if not slot.is_empty]

    def _all_slots(self) -> list[Slot]:
        return [module for module in self.modules() if isinstance(module, Slot)]

    def _slots_named(self, name: str) -> tuple[Slot, ...]:
        slots = self.slots
        if name not in slots:
            raise ValueError(
                f"unknown slot {name!r} for {type(self).__name__}; valid slots are "
                f"{', '.join(slots)}"
            )
        return slots[name]


def _copy_sharing_generators(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose submodules keep the original ``torch.Generator`` objects."""
    memo = {
        id(value): value
        for submodule in module.modules()
        for value in vars(submodule).values()
        if isinstance(value, torch.Generator)
    }
    return copy.deepcopy(module, memo)
