"""Generate the default data (the world) into a folder.

    python data/generate.py --out runs/default/data --preset cpu --seed 0 [key=value ...]

`key=value` overrides any DataConfig field (e.g. n_people=24). See data/README.md for what is written.
"""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minigpt.config import PRESET_NAMES, DataConfig, load_config  # noqa: E402
from minigpt.run import lock_stage_folder, run_main  # noqa: E402
from minigpt.world import generate_world  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write the files into")
    parser.add_argument("--preset", default="cpu", choices=PRESET_NAMES, help="world size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="DataConfig key=value overrides")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    config = load_config(DataConfig, args.preset, args.overrides)
    lock_stage_folder(Path(args.out))  # one writer per folder, as for every stage
    start = time.perf_counter()
    stats = generate_world(args.out, config, args.seed)
    print(f"wrote the {args.preset} world (seed {args.seed}) to {args.out} in {time.perf_counter() - start:.1f}s")
    print(json.dumps({key: value for key, value in stats.items() if key != "config"}, indent=1))


if __name__ == "__main__":
    run_main(main)
