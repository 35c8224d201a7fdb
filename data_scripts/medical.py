"""Fetch, verify and prepare the medical datasets: ACDC cardiac MRI (WSL4MIS h5 with scribbles).

Usage: python data_scripts/medical.py --root DIR [--subset course] [--check] [name ...]
Same as `seglab data get <name> --root DIR` for each dataset of the family (see seglab.data.download).
"""
import sys

from seglab.data.download import family_main

if __name__ == "__main__":
    sys.exit(family_main("medical", sys.argv[1:]))
