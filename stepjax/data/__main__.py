"""`python -m stepjax.data NAME [--data_dir DIR]`: prepare a tfds dataset (see `prepare`)."""

import argparse

from stepjax.data.datasets import DATASETS
from stepjax.data.prepare import prepare


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m stepjax.data", description=__doc__)
    parser.add_argument("name", choices=sorted(DATASETS))
    parser.add_argument("--data_dir", default=None, help="tfds data directory (default: tfds's)")
    args = parser.parse_args()
    try:
        print(f"{args.name} prepared in {prepare(args.name, args.data_dir)}")
    except ImportError as error:
        parser.exit(1, f"error: {error}\n")


if __name__ == "__main__":
    main()
