"""Fetch, verify and prepare the finegrained datasets: CUB-200-2011.

Usage: python data_scripts/finegrained.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("finegrained", sys.argv[1:]))
