"""Fetch, verify and prepare the coco datasets: COCO 2014, COCO-20i folds, COCO-Stuff-27.

Usage: python data_scripts/coco.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("coco", sys.argv[1:]))
