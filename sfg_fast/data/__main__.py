"""``python -m sfg_fast.data NAME [--data-dir DIR] ...``: load (and cache) a dataset, print its summary."""
import argparse
import json

from .load import DATASETS, load_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sfg_fast.data", description=__doc__)
    parser.add_argument("name", nargs="?", default="movielens100k", choices=DATASETS)
    parser.add_argument("--data-dir")
    parser.add_argument("--cache-dir")
    parser.add_argument("--seed", type=int, default=2018)
    parser.add_argument("--max-rows", type=int)
    parser.add_argument("--min-count", type=int)
    parser.add_argument("--num-rows", type=int)
    parser.add_argument("--skip-bad-lines", action="store_true")
    args = parser.parse_args(argv)
    data = load_dataset(args.name, data_dir=args.data_dir, cache_dir=args.cache_dir, seed=args.seed,
                        max_rows=args.max_rows, min_count=args.min_count, skip_bad_lines=args.skip_bad_lines,
                        num_rows=args.num_rows)
    print(data)
    for split_name, split in data.splits().items():
        print(f"  {split_name:5s} {len(split):>10d} rows, click rate {split.positive_rate():.4f}")
    for field_name, dim in zip(data.schema.field_names, data.schema.field_dims):
        print(f"  {field_name:18s} {dim:>10d} ids (OOV = {dim - 1})")
    print(json.dumps({k: v for k, v in data.info.items() if k != "skipped_examples"}, default=str))


if __name__ == "__main__":
    main()
