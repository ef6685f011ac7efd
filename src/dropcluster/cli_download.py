"""The ``dropcluster download`` command: fetch a data set into the data folder, resumably.

One command per data set of :mod:`dropcluster.data.downloads`: the official files, checked
against their published MD5 (``--md5`` another, ``--no-md5-check`` none; the content is checked
either way), extracted safely and marked complete. An interrupted download keeps what arrived
(``.NAME.part`` in the data folder); the same command again downloads only the rest.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dropcluster.validation import check_choice, path_argument

__all__ = ["DOWNLOAD_NAMES", "add_download_parser"]

#: The data sets ``dropcluster download`` fetches.
DOWNLOAD_NAMES = (
    "fashion-mnist",
    "cifar10",
    "cifar100",
    "tiny-imagenet",
    "cifar10-c",
    "cifar100-c",
    "tiny-imagenet-c",
)


def add_download_parser(commands) -> None:
    """Add ``dropcluster download`` to the subcommands ``commands`` of the main parser."""
    download = commands.add_parser(
        "download",
        help="download a data set (resumable, checked) into the data folder",
        description=(
            "Download a data set into the data folder (--data-dir, default $DROPCLUSTER_DATA, "
            "else ~/.cache/dropcluster/data), check its MD5 and content, and extract it. Run "
            "the same command again after an interruption: it downloads only the rest. "
            "fashion-mnist is not downloaded where Debian's dataset-fashion-mnist package is "
            "installed, unless --data-dir or --url is given."
        ),
    )
    # No `choices`: an unknown name is then one line (argparse would add its usage).
    download.add_argument("dataset", metavar="DATASET", help="one of " + ", ".join(DOWNLOAD_NAMES))
    download.add_argument(
        "--data-dir",
        type=path_argument,
        default=None,
        help="the data folder (created); the data set goes into its own subfolder "
        "(default: $DROPCLUSTER_DATA, else ~/.cache/dropcluster/data)",
    )
    download.add_argument(
        "--url",
        default=None,
        help="download from here instead of the official place (a mirror, a local copy): the "
        "archive's URL, or for fashion-mnist the base URL of its four .gz files; http://, "
        "https:// or file://",
    )
    download.add_argument(
        "--md5",
        default=None,
        help="the archive's expected MD5 instead of the published one; required for "
        "tiny-imagenet-c, which has no verified published MD5 (or give --no-md5-check)",
    )
    download.add_argument(
        "--no-md5-check",
        action="store_true",
        help="skip the MD5 check, for a mirror whose files differ from the official ones (e.g. "
        "re-compressed); the content is still checked",
    )
    download.set_defaults(handler=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from dropcluster.data import downloads, fashion_mnist
    from dropcluster.data.datasets import default_root

    name = check_choice("dataset", args.dataset, DOWNLOAD_NAMES)
    if args.md5 is not None and args.no_md5_check:
        raise ValueError("give --md5 or --no-md5-check, not both")
    if args.md5 is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", args.md5):
        raise ValueError(f"--md5 should be 32 hexadecimal digits, but got {args.md5!r}")
    if args.md5 is not None and name == "fashion-mnist":
        raise ValueError(
            "fashion-mnist is four files, each with its published MD5, so --md5 does not apply: "
            "give --no-md5-check for a mirror whose files differ from the official ones"
        )
    if name == "tiny-imagenet-c" and args.md5 is None and not args.no_md5_check:
        raise ValueError(
            "tiny-imagenet-c has no published MD5 that could be verified: give the one Zenodo "
            "lists for Tiny-ImageNet-C.tar (https://zenodo.org/records/2536630) with --md5 HEX, "
            "or --no-md5-check to download it unchecked knowingly"
        )
    if name == "fashion-mnist" and args.data_dir is None and args.url is None:
        debian = fashion_mnist.DEFAULT_ROOT
        stems = [stem for pair in fashion_mnist.SPLIT_FILES.values() for stem in pair]
        if all((debian / (stem + ".gz")).is_file() or (debian / stem).is_file() for stem in stems):
            print(
                f"fashion-mnist: Debian's dataset-fashion-mnist package has installed it in "
                f"{debian}, where the loaders look first: nothing to download (give --data-dir "
                f"to download a copy anyway)",
                file=sys.stderr,
            )
            print(f"fashion-mnist: {debian}")
            return 0
    root = default_root() if args.data_dir is None else Path(args.data_dir)
    _check_writable(root)
    download = getattr(downloads, "download_" + name.replace("-", "_"))
    options: dict = {"progress": True}
    if args.url is not None:
        options["url"] = args.url
    if args.no_md5_check:
        options["md5"] = None
    elif args.md5 is not None:
        options["md5"] = args.md5.lower()
    try:
        folder = download(root, **options)
    except KeyboardInterrupt:
        print(
            f"\ndropcluster: download interrupted; what arrived is kept in {root} (a .part "
            f"file): run `dropcluster download {name}` again to download the rest",
            file=sys.stderr,
        )
        return 130
    print(f"{name}: {folder}")
    return 0


def _check_writable(root: Path) -> None:
    """Create ``root`` and make sure this process may write there, before any download."""
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(
            f"--data-dir should be a folder, but {root} is a file: choose another --data-dir"
        )
    root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK | os.X_OK):
        raise PermissionError(
            f"{root} is not writable: choose a folder you may write to with --data-dir"
        )
