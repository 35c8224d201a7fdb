"""Fetch, verify and prepare the synthetic datasets: Dataset Diffusion synthetic VOC set (manual: no redistribution).

Usage: python data_scripts/synthetic.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("synthetic", sys.argv[1:]))
