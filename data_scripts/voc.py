"""Fetch, verify and prepare the voc datasets: PASCAL VOC 2012, SBD, SegmentationClassAug, PASCAL-5i lists, ScribbleSup scribbles.

Usage: python data_scripts/voc.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("voc", sys.argv[1:]))
