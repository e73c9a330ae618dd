"""prepare-data throughput with the real TeleChat-12B tokenizer on a generated corpus of at least --megabytes MB,
with 1 and with 2 tokenizer processes, measured in one run.

    python benchmarks/prepare_data.py [--published ../shared/telechat] [--megabytes 200] [--seq-len 2048]

The corpus repeats the published SFT examples (published/sft/datas/*.jsonl), each copy made distinct by a counter,
so the text statistics are real.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from telechat_ascend.data import prepare_data


def make_corpus(sources: list[Path], target_bytes: int, folder: Path) -> Path:
    lines = [json.loads(line) for path in sources for line in path.read_text(encoding="utf-8").splitlines() if line]
    corpus = folder / "corpus.jsonl"
    written, copy = 0, 0
    with open(corpus, "w", encoding="utf-8") as out:
        while written < target_bytes:
            for record in lines:
                line = json.dumps({"input": f"{record['input']} ({copy})", "output": record["output"]},
                                  ensure_ascii=False) + "\n"
                written += len(line.encode("utf-8"))
                out.write(line)
            copy += 1
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--published", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "telechat")
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=2048)
    args = parser.parse_args()
    tokenizer = args.published / "12B"
    if not (tokenizer / "tokenizer.model").is_file():
        raise SystemExit(f"the real 12B tokenizer is not at {tokenizer}")
    Path(".cache").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="prepare_data-", dir=".cache"))
    try:
        corpus = make_corpus(sorted((args.published / "sft" / "datas").glob("*.jsonl")), args.megabytes * 10 ** 6,
                             work)
        size = corpus.stat().st_size
        rates = {}
        for workers in (1, 2):
            start = time.perf_counter()
            manifest = prepare_data(corpus, tokenizer, work / f"out-{workers}", args.seq_len, workers=workers,
                                    progress=False)
            seconds = time.perf_counter() - start
            rates[workers] = manifest["tokens"] / seconds
            print(f"{workers} process(es): {size / 1e6:.0f} MB, {manifest['tokens'] / 1e6:.1f}M tokens, "
                  f"{manifest['rows']} rows in {seconds:.1f} s = {rates[workers]:,.0f} tokens/s "
                  f"({size / 1e6 / seconds:.2f} MB/s)")
        print(f"2 processes / 1 process: {rates[2] / rates[1]:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
