"""
Times prepare_dataset.py on the real engravings: from the folder of JPEGs to the saved DatasetDict.

    python bench/prepare_benchmark.py --data_dir ../shared/data/engravings --image_size 512 --num_proc 2

Prints wall-clock images/s (the number to compare with the 50 img/s target) with the load average around the run,
since other processes on a shared machine slow it down, and appends them as one JSON line to --results_file.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir", default="../shared/data/engravings", help="Folder with images/ and metadata.csv."
    )
    parser.add_argument("--image_size", type=int, default=512, help="Side of the square output images.")
    parser.add_argument("--num_proc", type=int, default=2, help="Worker processes, as in prepare_dataset.py.")
    parser.add_argument(
        "--output_dir", default=None, help="Where the dataset is written (default: a temporary folder)."
    )
    parser.add_argument("--results_file", default=None, help="Append the result as a JSON line to this file.")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.data_dir, "metadata.csv")):
        parser.error(f"--data_dir {args.data_dir} has no metadata.csv; point it at the real engravings folder.")
    return args


def run_timed(args, output_dir):
    argv = [
        "--source",
        args.data_dir,
        "--metadata",
        os.path.join(args.data_dir, "metadata.csv"),
        "--captioner",
        "metadata",
        "--output_dir",
        output_dir,
        "--image_size",
        str(args.image_size),
        "--num_proc",
        str(args.num_proc),
    ]
    # Run as a user runs it: the script in its own process (its start-up is part of the time).
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO_ROOT / "prepare_dataset.py"), *argv], check=True)
    return time.perf_counter() - start


def main(args):
    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or scratch
        load_before = os.getloadavg()[0]
        wall = run_timed(args, output_dir)
        report = json.loads(Path(output_dir, "report.json").read_text())
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "image_size": args.image_size,
        "num_proc": args.num_proc,
        "total_files": report["total_files"],
        "kept": report["kept"],
        "seconds": round(wall, 1),
        "images_per_second": round(report["total_files"] / wall, 1),
        "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    if args.results_file:
        with open(args.results_file, "a") as handle:
            handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main(parse_args())
