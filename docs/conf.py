# Sphinx configuration of the course website. Build it with `seglab docs` (see seglab/course.py, from
# nbs/00_foundations/07b_course.ipynb): that command writes the pages next to a copy of this file and runs Sphinx.
# Nothing here is fetched from the network: MathJax comes from sphinx-mathjax-offline, notebooks are never executed.
import configparser
from pathlib import Path

_ini = configparser.ConfigParser(delimiters=["="])
_ini.read(Path(__file__).resolve().parent / "settings.ini", encoding="utf-8")
_s = _ini["DEFAULT"]

project = _s.get("title", "seglab")
author = _s.get("author", "")
copyright = _s.get("copyright", "")
version = release = _s.get("version", "")

extensions = [
    "myst_nb",                 # notebooks and MyST markdown
    "sphinx.ext.autodoc",      # API pages of the foundations
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static, no CDN
]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "conf.py", "settings.ini"]
root_doc = "index"

# notebooks: show the recorded outputs, never execute
nb_execution_mode = "off"
nb_render_markdown_format = "myst"   # show_doc's markdown outputs, with math
nb_ipywidgets_js = {}                # widget JavaScript would come from a CDN; the recorded outputs are static
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "html_image", "attrs_inline"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header", "myst.xref_missing", "mystnb.unknown_mime_type", "misc.highlighting_failure"]

autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False}
autodoc_typehints = "signature"

html_theme = "sphinx_book_theme"
html_title = f"{project}: {_s.get('description', '')}"
html_static_path = ["_static"]
html_theme_options = {
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
    "use_repository_button": False,
}
html_show_sourcelink = False
html_context = {"default_mode": "light"}   # an empty theme mode logs a console error (pydata-sphinx-theme)
