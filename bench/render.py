"""Rendering cost of an invoice PDF, measured three ways on the same documents in one run.

- baseline: what a first implementation does: the document as one self-contained HTML string (inline
  CSS, the system's DejaVu Sans found by fontconfig), ``HTML(string=...).write_pdf()`` with defaults,
  per document;
- floor: layout alone, ``HTML(...).render()`` of the project's template and stylesheets, as WeasyPrint
  does it by default (a FontConfiguration and parsed stylesheets of its own per document);
- warm layout (for information): the same layout with the project's FontConfiguration and parsed
  stylesheets reused, i.e. the layout part of the project's own time;
- project: ``Renderer.attachment()``, exactly as the DAG calls it (shipped subset font, one
  FontConfiguration and parsed stylesheets per process).

Prints CPU ms per document for each (the median; the methods take turns on each document), what the
templating costs in the sandbox and outside it, the PDF sizes, whether HarfBuzz subsetting was available, and as
the cost of a ``FACTURX`` and an ``EHF`` document beside the PDF (and of their XML and its EN 16931 check, in the
process and through a worker's validator process), and as
its last line: ``render: baseline X ms, floor F ms, project Y ms, speedup S, overhead O, pdf_kb K``
(S = X / Y, O = Y / F) for the one-page invoice. Run: ``make bench`` or ``python bench/render.py``.
"""

from __future__ import annotations

import argparse
import gc
import io
import logging
import statistics
import sys
import time
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jinja2 import Environment, FileSystemLoader  # noqa: E402
from pypdf import PdfReader  # noqa: E402
from weasyprint import CSS, HTML  # noqa: E402
from weasyprint.text.fonts import FontConfiguration  # noqa: E402

from include.invoice_mailing.i18n import Formats  # noqa: E402
from include.invoice_mailing.render import NamedUndefined, Renderer  # noqa: E402
from include.invoice_mailing.rules import Customer, CustomerAddress, Document, DocumentLine  # noqa: E402

PRODUCTS = ("Kaffebønner, hele 1 kg", "Røkt laks, skivet (kg)", "Tyttebærsyltetøy 3 kg", "Kjølevitrine, leie",
            "Engangshansker nitril M, 100 stk", "Filterkaffe, malt 500 g", "Servietter hvite 33x33", "Havredrikk 1 l")


def invoice(number: int, lines: int) -> Document:
    rows = []
    for n in range(1, lines + 1):
        quantity, price, rate = Decimal(1 + (n * 7) % 23), Decimal(f"{50 + (n * 37) % 900}.{n % 100:02d}"), \
            Decimal((25, 15, 12)[n % 3])
        rows.append(DocumentLine(n, PRODUCTS[n % len(PRODUCTS)], quantity, price, rate,
                                 (quantity * price).quantize(Decimal("0.01"))))
    net = sum((r.amount for r in rows), Decimal(0))
    basis = {rate: sum((r.amount for r in rows if r.vat_rate == rate), Decimal(0)) for rate in {r.vat_rate for r in rows}}
    vat = sum(((b * rate / 100).quantize(Decimal("0.01"), ROUND_HALF_UP) for rate, b in basis.items()), Decimal(0))
    day = date(2026, 11, 23)
    return Document("INV", f"INV{number:06d}", "10001", "Open", day, day + timedelta(days=14), "NOK", net + vat, vat,
                    "Varelevering uke 47 – Bølgen Kafé", "PO-4471", tuple(rows))


CUSTOMER = Customer("10001", "Bølgen Kafé & Bakeri AS", "DOMESTIC", locale="nb_NO")
ADDRESS = CustomerAddress("10001", "NO", "Bryggen 3", "5003", "Bergen", "987654325", "NO987654325MVA", "0192:987654325")


def measure_e_invoices(renderer: Renderer, documents: list[Document]) -> dict:
    """CPU ms per document of each format as the DAG makes it, and of the parts an e-invoice adds: the
    XML and its check against the XSD and the EN 16931 schematron (the validator loaded beforehand: a
    task process loads it once, at its first e-invoice)."""
    from include.invoice_mailing import einvoice, einvoice_check

    checker = einvoice_check.checker()
    started = time.perf_counter()
    checker.warm()
    load = time.perf_counter() - started
    reference = "100011000100"

    def built(doc):
        return einvoice.build(doc, CUSTOMER, ADDRESS, renderer.company, reference)

    pdf = {d.ref_nbr: renderer.attachment(d, CUSTOMER, None, "invoice", "PDF", "nb_NO").content for d in documents}
    cii = {d.ref_nbr: einvoice.to_cii(built(d)) for d in documents}
    ubl = {d.ref_nbr: einvoice.to_ubl(built(d), pdf[d.ref_nbr], "Faktura.pdf") for d in documents}

    def attachment(fmt):
        return lambda d: renderer.attachment(d, CUSTOMER, None, "invoice", fmt, "nb_NO", address=ADDRESS)

    def nothing(output):
        return None

    results = timed({
        "PDF": (attachment("PDF"), nothing),
        "FACTURX": (attachment("FACTURX"), nothing),
        "EHF": (attachment("EHF"), nothing),
        "cii": (lambda d: einvoice.to_cii(built(d)), nothing),
        "ubl": (lambda d: einvoice.to_ubl(built(d), pdf[d.ref_nbr], "Faktura.pdf"), nothing),
        "check_cii": (lambda d: checker.check(cii[d.ref_nbr], "CII"), nothing),
        "check_ubl": (lambda d: checker.check(ubl[d.ref_nbr], "UBL"), nothing),
    }, documents)
    return {"load": load, **{name: value for name, (value, _) in results.items()},
            **measure_service(list(cii.values()), list(ubl.values()))}


def measure_service(cii: list[bytes], ubl: list[bytes]) -> dict:
    """A check as a task process in a worker makes it: sent to the worker's validator process. Wall ms a
    check (the task process waits for it; the validator's CPU is spent in the other process), the task
    process's own CPU ms for it, and the validator process's memory (the Saxon no task process holds)."""
    import os

    import psutil

    from include.invoice_mailing import validator_service

    [validator] = validator_service.start(processes=1)
    remote = validator_service.ServiceChecker(os.environ.pop(validator_service.SOCKET_ENV))
    started = time.perf_counter()
    remote.warm()
    ready = time.perf_counter() - started
    figures = {}
    for name, syntax, documents in (("cii", "CII", cii), ("ubl", "UBL", ubl)):
        remote.result(documents[0], syntax)
        wall, cpu = [], []
        for xml in documents:
            w, c = time.perf_counter(), time.process_time()
            assert remote.result(xml, syntax).ok, "a valid document is refused"
            wall.append((time.perf_counter() - w) * 1000)
            cpu.append((time.process_time() - c) * 1000)
        figures[f"service_{name}"] = statistics.median(wall)
        figures[f"service_{name}_cpu"] = statistics.median(cpu)
    assert not remote.local, "the validator process did not answer"
    figures["service_ready"] = ready
    figures["service_rss"] = psutil.Process(validator.pid).memory_info().rss / 2**20
    validator.terminate()
    validator.wait(10)
    return figures


def timed(methods: dict, documents) -> dict[str, tuple[float, list]]:
    """Per method, the median CPU ms per document and what its ``keep`` takes of each output.

    ``methods`` maps a name to ``(fn, keep)``. Each method is warmed up once, then the methods take
    turns on each document, so that a change of load on a shared machine falls on all of them alike;
    CPU time, because waiting for a core is not rendering cost. Laid-out documents are dropped at once,
    so that no method pays for the garbage of the one before."""
    for fn, _ in methods.values():
        fn(documents[0])
    times: dict[str, list] = {name: [] for name in methods}
    kept: dict[str, list] = {name: [] for name in methods}
    for doc in documents:
        for name, (fn, keep) in methods.items():
            gc.collect()
            start = time.process_time()
            output = fn(doc)
            times[name].append((time.process_time() - start) * 1000)
            kept[name].append(keep(output))
            del output
    return {name: (statistics.median(times[name]), kept[name]) for name in methods}


def measure(renderer: Renderer, documents: list[Document]) -> dict:
    formats = Formats("nb_NO")

    def context_for(doc):
        return renderer.document_context(doc, CUSTOMER, "Kari Nordmann", formats)

    def html_for(doc, for_pdf):
        return renderer.report_html("invoice", context_for(doc), for_pdf=for_pdf, formats=formats)

    baseline_html = {d.ref_nbr: html_for(d, False) for d in documents}
    project_html = {d.ref_nbr: html_for(d, True) for d in documents}
    sheets = renderer.stylesheets("invoice")

    folder = renderer.templates_dir / "reports"
    # The same template over the same values, outside the sandbox: what the sandbox's checks cost.
    unsandboxed = Environment(loader=FileSystemLoader(renderer.templates_dir), undefined=NamedUndefined,
                              autoescape=True, trim_blocks=True, lstrip_blocks=True)

    def default_layout(doc):
        font_config = FontConfiguration()
        fresh = [CSS(filename=str(folder / name), font_config=font_config) for name in ("invoice.css", "print.css")]
        return HTML(string=project_html[doc.ref_nbr], base_url=str(renderer.templates_dir)).render(
            stylesheets=fresh, font_config=font_config)

    def nothing(output):
        return None

    results = timed({
        "baseline": (lambda d: HTML(string=baseline_html[d.ref_nbr]).write_pdf(), bytes),
        "floor": (default_layout, nothing),
        "warm": (lambda d: HTML(string=project_html[d.ref_nbr], base_url=str(renderer.templates_dir)).render(
            stylesheets=sheets, font_config=renderer.font_config), nothing),
        "project": (lambda d: renderer.attachment(d, CUSTOMER, "Kari Nordmann", "invoice", "PDF", "nb_NO"),
                    lambda attachment: attachment.content),
        "templating": (lambda d: html_for(d, True), nothing),
        "unsandboxed": (lambda d: unsandboxed.get_template("reports/invoice.html.j2").render(
            {**context_for(d), "for_pdf": True, "page_label": ("", "", "")}), nothing),
    }, documents)
    (baseline, baseline_pdfs), (project, pdfs) = results["baseline"], results["project"]
    for pdf in pdfs + baseline_pdfs:
        text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
        assert pdf.startswith(b"%PDF-") and pdf.rstrip().endswith(b"%%EOF"), "not a whole PDF"
        assert "Bølgen Kafé" in text and "Kjølevitrine" in text and "Å betale" in text, "text does not extract"
    return {"baseline": baseline, "floor": results["floor"][0], "warm": results["warm"][0], "project": project,
            "templating": results["templating"][0], "unsandboxed": results["unsandboxed"][0],
            "pages": len(PdfReader(io.BytesIO(pdfs[0])).pages),
            "pdf_kb": statistics.mean(len(p) for p in pdfs) / 1024,
            "baseline_kb": statistics.mean(len(p) for p in baseline_pdfs) / 1024}


def harfbuzz_subsetting() -> bool:
    import weasyprint.pdf.fonts
    from weasyprint.text.ffi import harfbuzz

    return bool(weasyprint.pdf.fonts.harfbuzz_subset) and bool(harfbuzz.hb_version_atleast(4, 1, 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="one-page invoices to render (default 20)")
    parser.add_argument("--long", type=int, default=5, help="300-line invoices to render (default 5)")
    parser.add_argument("--fonttools", action="store_true",
                        help="measure as on a system without HarfBuzz's subsetter (fontTools subsets fonts)")
    args = parser.parse_args()
    if args.fonttools:
        import weasyprint.pdf.fonts

        weasyprint.pdf.fonts.harfbuzz_subset = None
    logging.getLogger("weasyprint").setLevel(logging.ERROR)
    renderer = Renderer()
    print(f"HarfBuzz subsetting available: {'yes' if harfbuzz_subsetting() else 'no (fontTools subsets fonts)'}")
    long = measure(renderer, [invoice(500 + i, 300) for i in range(args.long)])
    print(f"300-line invoice ({long['pages']} pages, {args.long} documents): baseline {long['baseline']:.0f} ms, "
          f"floor {long['floor']:.0f} ms, warm layout {long['warm']:.0f} ms, project {long['project']:.0f} ms, "
          f"speedup {long['baseline'] / long['project']:.2f}, overhead {long['project'] / long['floor']:.2f}, "
          f"pdf_kb {long['pdf_kb']:.0f}")
    one = measure(renderer, [invoice(100 + i, 8) for i in range(args.n)])
    print(f"one-page invoice ({one['pages']} page, {args.n} documents): PDF {one['pdf_kb']:.1f} kB "
          f"(baseline's {one['baseline_kb']:.1f} kB); warm layout {one['warm']:.0f} ms, so the project's PDF writing "
          f"and templating take {one['project'] - one['warm']:.0f} ms")
    print(f"templating (values and report HTML): {one['templating']:.2f} ms in the sandbox, "
          f"{one['unsandboxed']:.2f} ms for the same template outside it")
    e = measure_e_invoices(renderer, [invoice(700 + i, 8) for i in range(args.n)])
    print(f"validator: loaded in {e['load']:.2f} s (Saxon-HE compiling the schematron, the XSDs); in a worker, "
          f"once by its validator process (answering {e['service_ready']:.2f} s after its start, "
          f"RSS {e['service_rss']:.0f} MB), not by the task processes")
    print(f"check through the worker's validator process: CII {e['service_cii']:.1f} ms, UBL {e['service_ubl']:.1f} ms "
          f"a document (wall, the task process waiting; its own CPU {e['service_cii_cpu']:.2f} ms, "
          f"{e['service_ubl_cpu']:.2f} ms); in-process CPU: CII {e['check_cii']:.1f} ms, UBL {e['check_ubl']:.1f} ms")
    print(f"e-invoice (one-page invoice, {args.n} documents): PDF {e['PDF']:.0f} ms, "
          f"FACTURX {e['FACTURX']:.0f} ms (CII {e['cii']:.1f} ms, its check {e['check_cii']:.1f} ms), "
          f"EHF {e['EHF']:.0f} ms (UBL with the PDF {e['ubl']:.1f} ms, its check {e['check_ubl']:.1f} ms); "
          f"FACTURX/PDF {e['FACTURX'] / e['PDF']:.2f}, EHF/PDF {e['EHF'] / e['PDF']:.2f}")
    print(f"render: baseline {one['baseline']:.0f} ms, floor {one['floor']:.0f} ms, project {one['project']:.0f} ms, "
          f"speedup {one['baseline'] / one['project']:.2f}, overhead {one['project'] / one['floor']:.2f}, "
          f"pdf_kb {one['pdf_kb']:.1f}")


if __name__ == "__main__":
    main()
