"""Ray's runtime environment from the command line: ``--runtime-env`` as inline JSON or a file.

Ray ships a runtime environment (``working_dir``, ``pip``, ``env_vars``, ...) to the nodes that
run a job's tasks; this module only reads it. Ray's own check of its fields happens in
:mod:`dropcluster.experiments.backends.ray`, which needs Ray installed; reading needs nothing
but PyYAML for a YAML file (installed with Ray).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = [
    "read_runtime_env",
]


def read_runtime_env(text: str) -> dict[str, Any]:
    """The runtime environment ``text`` gives: a JSON object (``text`` starts with ``{``), or
    the path of a ``.json``, ``.yaml`` or ``.yml`` file holding one.

    Relative paths inside it (``working_dir``) are Ray's business: Ray resolves them from the
    folder the sweep runs in, not from the file's.

    Raises:
        ValueError: not valid JSON/YAML, or not an object with names as keys (one line).
        OSError: the file cannot be read.
    """
    if text.lstrip().startswith("{"):
        source, document = "the JSON given", _parse_json(text, "--runtime-env")
    else:
        path = Path(text)
        if not path.is_file():
            raise ValueError(
                f"--runtime-env takes a JSON object or a .json/.yaml file, but {text!r} is "
                f"neither (no such file)"
            )
        source = str(path)
        content = path.read_text()
        if path.suffix.lower() in (".yaml", ".yml"):
            document = _parse_yaml(content, source)
        else:
            document = _parse_json(content, source)
    if not isinstance(document, dict) or not all(isinstance(k, str) for k in document):
        raise ValueError(
            f"--runtime-env should be an object such as "
            f'{{"working_dir": ".", "env_vars": {{"NAME": "value"}}}}, but {source} holds '
            f"{type(document).__name__ if not isinstance(document, dict) else 'other keys'}"
        )
    return document


def _parse_json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as error:
        raise ValueError(f"--runtime-env: {source} is not valid JSON ({error})") from None


def _parse_yaml(text: str, source: str) -> Any:
    try:
        import yaml
    except ImportError:
        raise ValueError(
            f"--runtime-env {source}: reading YAML needs PyYAML (it comes with Ray: pip install "
            f"-e '.[ray]'); or give the file as JSON"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise ValueError(f"--runtime-env: {source} is not valid YAML ({reason})") from None
