#!/usr/bin/env python3
"""Write a tiny random-weight MiniCPM-V 2.6 checkpoint in the original file layout.

Tests and the demo use it; nothing is downloaded. See minicpmv/devtools/tiny_checkpoint.py.
"""

from __future__ import annotations

import argparse
import logging

from minicpmv.devtools.tiny_checkpoint import write_tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument(
        "--int4", action="store_true", help="pre-quantize to bitsandbytes nf4 like the -int4 repo"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed (the same seed gives the same weights)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = write_tiny_checkpoint(args.out, int4=args.int4, seed=args.seed)
    logging.getLogger("make_tiny_checkpoint").info(
        "wrote %s checkpoint to %s", "int4" if args.int4 else "full", path
    )


if __name__ == "__main__":
    main()
