"""``python -m trainer``: the nightly full retrain, offline evaluation, and the model registry's versions, rollback and
promotion."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Train and evaluate the freshtower two-tower retrieval model.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Each command module registers its own parser and the function that runs it.
    from trainer import evaluate_cli, full, registry

    full.add_parser(sub)
    evaluate_cli.add_parser(sub)
    registry.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every CPU feature it tries
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
