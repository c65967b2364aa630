"""``python -m sfg_fast train | compare | analyze | quantize | predict``: the same command line as ``sfg-fast``."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
