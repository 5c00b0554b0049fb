"""Entry point of the ``ankle-fracture`` command.

Every sub-command lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
User errors (:class:`AnkleFractureError`) print one clear line and exit with status 2; an
unexpected failure prints a short message (the traceback only with ``--debug``) and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import List, Optional

from AnkleFractureLib import __version__
from AnkleFractureLib.errors import AnkleFractureError, CancelledError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every sub-command."""
    from AnkleFractureLib.cli import (batch_cmd, classify_cmd, dataset_cmd, demo_cmd,
                                      evaluate_cls_cmd, evaluate_fracture_cmd, evaluate_seg_cmd,
                                      info_cmd, phantom_cmd,
                                      register_cmd, run_cmd, segment_cmd, train_cls_cmd,
                                      train_fracture_cmd, train_seg_cmd)

    parser = argparse.ArgumentParser(
        prog="ankle-fracture",
        description="Ankle CT analysis: tibia/fibula segmentation, template registration, "
                    "syndesmosis crop and Danis-Weber classification. Research software, "
                    "not for clinical use.",
        epilog="Run 'ankle-fracture COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show full tracebacks for unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # In the order a user meets them: the product's main job first, then the single stages,
    # then training on one's own data.
    for module in (demo_cmd, run_cmd, batch_cmd, phantom_cmd, info_cmd, segment_cmd,
                   register_cmd, classify_cmd, dataset_cmd, train_seg_cmd, evaluate_seg_cmd,
                   train_cls_cmd, evaluate_cls_cmd, train_fracture_cmd, evaluate_fracture_cmd):
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CancelledError as exc:
        print(f"ankle-fracture: cancelled: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except AnkleFractureError as exc:
        print(f"ankle-fracture: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("\nankle-fracture: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last line of defence for the user
        if args.debug:
            traceback.print_exc()
        print(f"ankle-fracture: internal error: {type(exc).__name__}: {exc}\n"
              "This is a bug; please report it with the command you ran "
              "(add --debug for the traceback).", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
