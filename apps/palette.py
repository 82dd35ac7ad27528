"""The app's colours in one place: the token categories, the outline that keeps them readable on any photo,
and the sequential scale of heatmaps and numeric overlays. The overlay, its legend and the fraction bars all
read `CATEGORY_COLOURS`, so they cannot disagree.

Categories use Okabe-Ito colours (distinct under the common colour-vision deficiencies), drawn with a dark
outline: any fill vanishes on some photo (salmon on an orange suit, grey on grey), an outlined square does not.

Streamlit's plotly theme sends placeholder colours #000001 to #000040 and the browser swaps each for a theme
colour, so a colour of ours in that range is silently replaced: Magma starts at #000004, which turned
near-zero attention pink. Scales here are explicit lists outside that range.
"""

from __future__ import annotations

import re

from plotly.colors import sequential

CATEGORY_COLOURS = {"sink": "#CC79A7", "dead": "#56B4E9", "alive": "#009E73"}  # Okabe-Ito: purple, sky, green
OUTLINE = "#1B1B1B"  # near-black: readable on light photos, and the fill carries the colour on dark ones
SEQUENTIAL = [[index / (len(sequential.Viridis) - 1), colour] for index, colour in enumerate(sequential.Viridis)]
_THEME_PLACEHOLDER = re.compile(r"#0000(\d\d)")


def is_theme_placeholder(colour: str) -> bool:
    """Whether Streamlit's theme would replace `colour` in the browser (#000001 to #000040)."""
    match = _THEME_PLACEHOLDER.fullmatch(colour.strip())
    return match is not None and 1 <= int(match.group(1)) <= 40


def translucent(colour: str, alpha: float) -> str:
    """A '#RRGGBB' colour as 'rgba(r, g, b, alpha)': a see-through fill under an opaque outline."""
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, {alpha:g})"
