"""Render page 1 of a demo invoice in nb_NO and en_GB to PNG for the README (needs pdftoppm)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine  # noqa: E402

from include.invoice_mailing import demo, source  # noqa: E402
from include.invoice_mailing.render import Renderer  # noqa: E402

DOCUMENT = ("INV", "INV000104")  # a domestic invoice of eight lines


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/erp.db")
        demo.seed(engine)
        data = source.load_batch(engine, [DOCUMENT])
        [document] = data.documents
        customer = data.customers[document.customer_id]
        contact = data.contacts.get(customer.invoice_contact_id)
        renderer = Renderer()
        for locale in ("nb_NO", "en_GB"):
            pdf = Path(tmp) / f"{locale}.pdf"
            pdf.write_bytes(renderer.attachment(document, customer, contact and contact.display_name, "invoice",
                                                "PDF", locale, address=data.addresses.get(customer.customer_id)).content)
            target = ROOT / "docs" / f"invoice-{locale}"
            subprocess.run(["pdftoppm", "-png", "-r", "80", "-f", "1", "-l", "1", "-singlefile", str(pdf),
                            str(target)], check=True)
            print(f"{target}.png")


if __name__ == "__main__":
    main()
