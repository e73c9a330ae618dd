"""HF → MindSpore conversion of a 1B-shaped fp16 checkpoint (about 2.6 GB): wall time as a ratio to a plain copy of
the same files on the same disk (target ≤ 1.5×), and peak RSS against the largest shard (target ≤ shard + 300 MB).

    python benchmarks/convert_1b.py [--workdir DIR] [--repeats 2]

Copy and conversion run alternately in fresh processes after a sync, so each starts with the page cache in the same
state; the ratio uses the fastest run of each. Needs about 8 GB of free disk in the work folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COPY = """
import shutil, sys
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir()
for path in src.iterdir():
    shutil.copyfile(path, dst / path.name)
"""


def timed(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process, started with no dirty pages left by the last one."""
    os.sync()
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if status != 0:
        sys.exit(f"{' '.join(command)} failed with status {status}")
    return elapsed, usage.ru_maxrss * 1024  # Linux reports kilobytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder under ./.cache")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(".cache")
    root.mkdir(exist_ok=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="convert_1b-", dir=root))
    hf = workdir / "hf-1B-fp16"
    try:
        if not hf.exists():
            print(f"init --preset 1B --dtype fp16 -> {hf}", flush=True)
            subprocess.run([sys.executable, "-m", "telechat_ascend.cli", "init", "--preset", "1B", "--dtype", "fp16",
                            "--out", str(hf), "--quiet"], check=True)
        weights = sorted(hf.glob("*.safetensors"))
        total = sum(p.stat().st_size for p in hf.iterdir())
        largest = max(p.stat().st_size for p in weights)
        copies, conversions = [], []
        for repeat in range(args.repeats):
            copy_dir, ms_dir = workdir / f"copy-{repeat}", workdir / f"ms-{repeat}"
            copies.append(timed([sys.executable, "-c", COPY, str(hf), str(copy_dir)]))
            shutil.rmtree(copy_dir)
            conversions.append(timed([sys.executable, "-m", "telechat_ascend.cli", "convert", "--to", "mindspore",
                                      "--quiet", str(hf), str(ms_dir)]))
            shutil.rmtree(ms_dir)
        copy_s = min(s for s, _ in copies)
        convert_s = min(s for s, _ in conversions)
        peak = max(rss for _, rss in conversions)
        print(f"checkpoint: {total / 1e9:.2f} GB in {len(weights)} shard(s), largest {largest / 1e9:.2f} GB")
        print(f"plain copy:      {', '.join(f'{s:.2f}' for s, _ in copies)} s")
        print(f"convert to ckpt: {', '.join(f'{s:.2f}' for s, _ in conversions)} s")
        print(f"time ratio (convert / copy, fastest runs): {convert_s / copy_s:.2f}x  (target <= 1.5x)")
        print(f"peak RSS of convert: {peak / 1e6:.0f} MB; largest shard {largest / 1e6:.0f} MB "
              f"(target <= shard + 300 MB = {(largest + 300e6) / 1e6:.0f} MB)")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
