"""Fetch, verify and prepare the saliency datasets: DUTS-TR/TE, S-DUTS scribbles, ECSSD, DUT-OMRON, PASCAL-S, HKU-IS.

Usage: python data_scripts/saliency.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("saliency", sys.argv[1:]))
