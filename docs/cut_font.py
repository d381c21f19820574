"""Cut the shipped "Invoice Sans" from Debian's DejaVu Sans (fonts-dejavu-core): run once, commit the result.

The cut keeps what an invoice needs (Basic Latin, Latin-1, Latin Extended-A, punctuation, currency
signs) and drops the OpenType layout tables (GSUB/GPOS: ligatures and kerning) and hinting: WeasyPrint
drops them from the embedded font anyway, and fontTools would otherwise decompile them for every PDF.
The Bitstream Vera licence asks a modified font to be renamed, hence "Invoice Sans".
"""

from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTFont

SOURCE = Path("/usr/share/fonts/truetype/dejavu")
TARGET = Path(__file__).resolve().parents[1] / "include" / "templates" / "fonts"
RANGES = "U+0020-007E,U+00A0-017F,U+0192,U+02C6-02DC,U+2010-2027,U+2030-203A,U+2044,U+20A0-20CF,U+2116,U+2122,U+2212"

for source, style in (("DejaVuSans.ttf", "Regular"), ("DejaVuSans-Bold.ttf", "Bold")):
    options = subset.Options()
    options.layout_features = []
    options.name_IDs = ["*"]
    options.notdef_outline = True
    options.hinting = False
    options.drop_tables += ["FFTM", "GSUB", "GPOS", "GDEF", "kern", "MATH"]
    font = TTFont(SOURCE / source)
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=subset.parse_unicodes(RANGES))
    subsetter.subset(font)
    for record in font["name"].names:
        if record.nameID in (1, 16):
            record.string = "Invoice Sans"
        elif record.nameID == 4:
            record.string = "Invoice Sans" if style == "Regular" else f"Invoice Sans {style}"
        elif record.nameID == 6:
            record.string = f"InvoiceSans-{style}"
        elif record.nameID == 3:
            record.string = f"Invoice Sans {style}; derived from DejaVu Sans 2.37"
    font.save(TARGET / f"InvoiceSans-{style}.ttf")
    print(TARGET / f"InvoiceSans-{style}.ttf", len(font.getGlyphOrder()), "glyphs")
