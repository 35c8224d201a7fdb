"""Fetch, verify and prepare the video datasets: DAVIS 2017, QVHighlights annotations and features.

Usage: python data_scripts/video.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("video", sys.argv[1:]))
