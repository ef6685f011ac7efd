"""Adapters to training frameworks, each in its own module that imports its framework.

Nothing in the package imports these modules: ``import dropcluster`` never needs a framework.

- :mod:`dropcluster.integrations.lightning`: :class:`DropClusterRefit`, a PyTorch Lightning
  callback (``pip install -e '.[lightning]'`` in the dropcluster checkout).
"""
