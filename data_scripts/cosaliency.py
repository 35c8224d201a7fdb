"""Fetch, verify and prepare the cosaliency datasets: CoCA, CoSal2015, CoSOD3k, COCO-SEG (manual downloads).

Usage: python data_scripts/cosaliency.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("cosaliency", sys.argv[1:]))
