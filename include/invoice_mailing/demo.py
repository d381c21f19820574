"""Seed the embedded demo ERP: Fjordlys Handel AS, a Nordic wholesaler modelled on Visma.net ERP."""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import textwrap
import unicodedata
from collections import Counter
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import Engine, create_engine, delete, func, insert, inspect, select

from include.invoice_mailing import source
from include.invoice_mailing.rules import E_INVOICE_FORMATS

AS_OF = date(2026, 11, 24)
SEED = 20261124
CENT = Decimal("0.01")
TEMPLATE_ID = "InvoiceNotification"
AUDIT_URL = "http://localhost:8081/plugin/invoice-mailing"  # make audit-ui (dev/airflow_tool.py)
# Child tables first: the order rows are deleted in; inserts go the other way round.
TABLES = (source.invoice_line, source.invoice, source.mailing_recipient, source.mailing_setting, source.customer_address,
          source.customer, source.contact, source.notification_template, source.report, source.email_account,
          source.customer_class)

CLASSES = (("DOMESTIC", "Domestic customers (Norway)"), ("NORDIC", "Nordic customers (Sweden, Denmark, Finland)"),
           ("EXPORT", "Export customers (EU and UK)"), ("INTERNAL", "Internal accounts (no invoice mailing)"))
ACCOUNTS = ((1, "faktura@fjordlys.example", "Fjordlys Handel AS – Faktura"),
            (2, "invoices@fjordlys.example", "Fjordlys Handel – Invoicing"))
REPORTS = (("AR641000", "Invoice/Memo", "invoice"), ("AR641099", "Broken custom form", "no_such_template"))
EMPLOYEES = ((1, "Ingrid Regnskap", "regnskap@fjordlys.example"), (2, "Lars Kreditt", "kreditt@fjordlys.example"))
BOOKKEEPING, CREDIT_CONTROL = 1, 2

# Notification templates per locale ('' is the English fallback): (subject, greeting, attached, due, your ref,
# questions, regards). The pipeline renders them in a Jinja sandbox; ERP values arrive autoescaped.
TEMPLATE_TEXTS = {
    "": ("{{ document.type_label }} {{ document.number }} from {{ company.name }}", "Dear {{ customer.name }},",
         "Please find attached {{ document.type_label|lower }} {{ document.number }} dated {{ document.date }}"
         " for {{ document.total }}.",
         "Payment is due on {{ document.due_date }}. Please use the payment reference {{ payment_reference }}.",
         "Your reference: {{ document.customer_ref }}",
         "If you have any questions about this document, simply reply to this email.", "Kind regards"),
    "nb_NO": ("{{ document.type_label }} {{ document.number }} fra {{ company.name }}", "Hei {{ customer.name }},",
              "Vedlagt finner du {{ document.type_label|lower }} {{ document.number }} datert {{ document.date }}"
              " på {{ document.total }}.",
              "Forfallsdato er {{ document.due_date }}. Vennligst bruk KID {{ payment_reference }} ved betaling.",
              "Deres referanse: {{ document.customer_ref }}",
              "Har du spørsmål til dokumentet, er det bare å svare på denne e-posten.", "Vennlig hilsen"),
    "sv_SE": ("{{ document.type_label }} {{ document.number }} från {{ company.name }}", "Hej {{ customer.name }},",
              "Bifogat finner du {{ document.type_label|lower }} {{ document.number }} daterad {{ document.date }}"
              " på {{ document.total }}.",
              "Förfallodagen är {{ document.due_date }}. Ange OCR-nummer {{ payment_reference }} vid betalning.",
              "Er referens: {{ document.customer_ref }}",
              "Har du frågor om dokumentet går det bra att svara på det här mejlet.", "Med vänliga hälsningar"),
    "da_DK": ("{{ document.type_label }} {{ document.number }} fra {{ company.name }}", "Kære {{ customer.name }},",
              "Vedhæftet finder du {{ document.type_label|lower }} {{ document.number }} på {{ document.total }}"
              " dateret {{ document.date }}.",
              "Forfaldsdatoen er {{ document.due_date }}. Angiv venligst betalingsreference {{ payment_reference }}"
              " ved betaling.",
              "Jeres reference: {{ document.customer_ref }}",
              "Har du spørgsmål til dokumentet, er du velkommen til at besvare denne e-mail.", "Med venlig hilsen"),
    "fi_FI": ("{{ company.name }}: {{ document.type_label }} {{ document.number }}", "Hyvä {{ customer.name }},",
              "Liitteenä on {{ document.type_label|lower }} {{ document.number }}, päiväys {{ document.date }},"
              " summa {{ document.total }}.",
              "Eräpäivä on {{ document.due_date }}. Käytäthän maksaessasi viitenumeroa {{ payment_reference }}.",
              "Viitteenne: {{ document.customer_ref }}",
              "Jos sinulla on kysyttävää tästä asiakirjasta, vastaa tähän sähköpostiin.", "Ystävällisin terveisin"),
    "nl_NL": ("{{ document.type_label }} {{ document.number }} van {{ company.name }}", "Beste {{ customer.name }},",
              "Bijgevoegd vindt u {{ document.type_label|lower }} {{ document.number }} van {{ document.date }}"
              " ter waarde van {{ document.total }}.",
              "De vervaldatum is {{ document.due_date }}. Vermeld bij betaling het betalingskenmerk"
              " {{ payment_reference }}.",
              "Uw referentie: {{ document.customer_ref }}",
              "Heeft u vragen over dit document? Beantwoord dan gewoon deze e-mail.", "Met vriendelijke groet"),
}


class Market(NamedTuple):
    currency: str
    fx: Decimal                       # NOK list price -> this currency
    vat: tuple[str, str, str]         # standard, food, reduced rate (percent)
    mailbox: str                      # the customer's general address: <mailbox>@<slug>.example
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    texts: tuple[str, str, str]       # INV, CRM, DRM descriptions ({week} = ISO week)


MARKETS = {
    "nb_NO": Market("NOK", Decimal("1"), ("25", "15", "12"), "post",
                    ("Kari", "Ola", "Ingvild", "Håkon", "Siri", "Bjørn", "Marit", "Øystein", "Solveig", "Torbjørn"),
                    ("Nordmann", "Hansen", "Østby", "Bakken", "Sæther", "Lie", "Haugland", "Aasen", "Strømme"),
                    ("Varelevering uke {week}", "Kreditering, retur uke {week}",
                     "Tilleggsfakturering frakt uke {week}")),
    "sv_SE": Market("SEK", Decimal("0.97"), ("25", "12", "6"), "info",
                    ("Anna", "Erik", "Lena", "Björn", "Karin", "Göran", "Maja", "Sören"),
                    ("Lindqvist", "Åberg", "Sjöberg", "Nyström", "Bergström", "Öhman", "Karlsson"),
                    ("Varuleverans vecka {week}", "Kreditering, retur vecka {week}",
                     "Tilläggsdebitering frakt vecka {week}")),
    "da_DK": Market("DKK", Decimal("0.63"), ("25", "25", "25"), "kontakt",
                    ("Mette", "Søren", "Line", "Jesper", "Ane", "Rasmus"),
                    ("Jørgensen", "Nielsen", "Skovgaard", "Møller", "Kjær", "Bech"),
                    ("Varelevering uge {week}", "Kreditering, returvarer uge {week}",
                     "Efterfakturering fragt uge {week}")),
    "fi_FI": Market("EUR", Decimal("0.085"), ("25.5", "14", "14"), "info",
                    ("Aino", "Juha", "Päivi", "Mikko", "Sanna", "Jyrki"),
                    ("Virtanen", "Mäkinen", "Kärkkäinen", "Heikkilä", "Nieminen", "Järvinen"),
                    ("Tavaratoimitus viikko {week}", "Hyvitys, palautus viikko {week}",
                     "Lisälaskutus rahti viikko {week}")),
    "nl_NL": Market("EUR", Decimal("0.085"), ("21", "9", "9"), "info",
                    ("Sanne", "Joost", "Femke", "Pieter", "Anouk", "Bram"),
                    ("de Vries", "Jansen", "van Dijk", "Bakker", "Visser", "Smit"),
                    ("Levering week {week}", "Creditering retour week {week}", "Naberekening vracht week {week}")),
    # No German catalog of labels (i18n.SUPPORTED) and so no German notification template: the German customer
    # reads English, with German numbers and dates, as from many a Nordic supplier.
    "de_DE": Market("EUR", Decimal("0.085"), ("19", "7", "7"), "info",
                    ("Julia", "Matthias", "Katrin", "Stefan", "Anja", "Jürgen"),
                    ("Müller", "Schäfer", "Weiß", "Köhler", "Becker", "Hoffmann"),
                    ("Warenlieferung KW {week}", "Gutschrift Retoure KW {week}", "Nachbelastung Fracht KW {week}")),
    "en_GB": Market("GBP", Decimal("0.072"), ("20", "0", "0"), "accounts",
                    ("Olivia", "James", "Emily", "Tom", "Charlotte", "Harry"),
                    ("Smith", "Taylor", "Brown", "O'Neill", "Walker", "Hughes"),
                    ("Goods delivery week {week}", "Credit for returned goods, week {week}",
                     "Additional freight charge, week {week}")),
}
ENGLISH_ITEMS = ("fi_FI", "nl_NL", "de_DE", "en_GB")  # the item master is Norwegian, with English translations

# (id, name, class, locale). Domestic customers are invoiced in NOK with Norwegian VAT whatever their language.
CUSTOMERS = (
    ("10001", "Bølgen Kafé AS", "DOMESTIC", "nb_NO"),
    ("10002", "Fjellheimen Hotell AS", "DOMESTIC", "nb_NO"),
    ("10003", "Nordlys Bakeri AS", "DOMESTIC", "nb_NO"),
    ("10004", "Kaffebrenneriet Løvenskiold AS", "DOMESTIC", "nb_NO"),
    ("10005", "Sjøsiden Restaurant AS", "DOMESTIC", "nb_NO"),
    ("10006", "Trøndersk Matforsyning AS", "DOMESTIC", "nb_NO"),
    ("10007", "Hytteliv Dagligvare AS", "DOMESTIC", "nb_NO"),
    ("10008", "Fiskebrygga Spiseri AS", "DOMESTIC", "nb_NO"),
    ("10009", "Ålesund Kantinedrift AS", "DOMESTIC", "nb_NO"),
    ("10010", "Bryggen Gjestehus AS", "DOMESTIC", "nb_NO"),
    ("10011", "Berg & Co <b>Engros</b> AS", "DOMESTIC", "nb_NO"),
    ("10012", "Lofoten Kaffebar AS", "DOMESTIC", "nb_NO"),
    ("10013", "Solstrand Catering AS", "DOMESTIC", "nb_NO"),
    ("10014", "Grünerløkka Brødbutikk AS", "DOMESTIC", "nb_NO"),
    ("10015", "Tromsø Kaffehus AS", "DOMESTIC", "nb_NO"),
    ("10016", "Skog og Fjære Bistro AS", "DOMESTIC", "nb_NO"),
    ("10017", "Vestkyst Møteromsservice AS", "DOMESTIC", "nb_NO"),
    ("10018", "Røros Konditori AS", "DOMESTIC", "nb_NO"),
    ("10019", "Nøtterøy Dagligvare AS", "DOMESTIC", "nb_NO"),
    ("10020", "The Scotsman Oslo AS", "DOMESTIC", "en_GB"),
    ("10021", "Åkerlund & Söner AB", "NORDIC", "sv_SE"),
    ("10022", "Göteborgs Kafferosteri AB", "NORDIC", "sv_SE"),
    ("10023", "Smörgåsbaren i Malmö AB", "NORDIC", "sv_SE"),
    ("10024", "Västerås Storkök AB", "NORDIC", "sv_SE"),
    ("10025", "Kåre Lindqvists Konditori AB", "NORDIC", "sv_SE"),
    ("10026", "Norrlands Café & Bageri AB", "NORDIC", "sv_SE"),
    ("10027", "Københavns Kaffebar ApS", "NORDIC", "da_DK"),
    ("10028", "Ærø Købmandsgaard ApS", "NORDIC", "da_DK"),
    ("10029", "Østerbro Bageri ApS", "NORDIC", "da_DK"),
    ("10030", "Aarhus Smørrebrød A/S", "NORDIC", "da_DK"),
    ("10031", "Kahvila Kärkkäinen Oy", "NORDIC", "fi_FI"),
    ("10032", "Helsingin Leipomo Oy", "NORDIC", "fi_FI"),
    ("10033", "Tampereen Tukku Oy", "NORDIC", "fi_FI"),
    ("10034", "Oulun Jäätelöbaari Oy", "NORDIC", "fi_FI"),
    ("10035", "De Koffiebrander B.V.", "EXPORT", "nl_NL"),
    ("10036", "Bakkerij van der Berg B.V.", "EXPORT", "nl_NL"),
    ("10037", "Amsterdamse Broodjeszaak B.V.", "EXPORT", "nl_NL"),
    ("10038", "Café 't Hoekje V.O.F.", "EXPORT", "nl_NL"),
    ("10039", "Groothandel Smit & Zonen B.V.", "EXPORT", "nl_NL"),
    ("10040", "Highland Coffee Traders Ltd", "EXPORT", "en_GB"),
    ("10041", "The Nordic Larder Ltd", "EXPORT", "en_GB"),
    ("10042", "Brighton Bakehouse Ltd", "EXPORT", "en_GB"),
    ("10043", "Thames Catering Supplies Ltd", "EXPORT", "en_GB"),
    ("10044", "Edinburgh Deli Co. Ltd", "EXPORT", "en_GB"),
    ("10045", "Cornish Fika Ltd", "EXPORT", "en_GB"),
    ("10046", "Fjordlys Handel AS – Personalkantine", "INTERNAL", "nb_NO"),  # its class has no mailing: no_mailing
)
# Customers who book e-invoices (docs/rules.md, rule 5), each format chosen one of the three ways the ERP allows:
# the customer's mailing (10047), its invoice contact's preference (10048, 10050), a recipient row (10049).
# They are seeded from a random stream of their own, so that the customers above keep their contacts and
# documents whatever is added here.
E_INVOICE_CUSTOMERS = (
    ("10047", "Havbris Kantinedrift AS", "DOMESTIC", "nb_NO"),       # EHF by its mailing's format
    ("10048", "Nordkapp Sjømat AS", "DOMESTIC", "nb_NO"),            # EHF by its invoice contact's preference
    ("10049", "Kaffeehaus Brenner GmbH", "EXPORT", "de_DE"),         # FACTURX by a recipient row's format
    ("10050", "Fjellbris Storkjøkken AS", "DOMESTIC", "nb_NO"),      # EHF preferred, but no customer_address
)
# customer_address: the e-invoice customers but 10050, and a few PDF and HTML customers, for whom it is optional.
# (customer, street, postal code, city, country, org number, VAT number, PEPPOL id): valid by python-stdnum.
ADDRESSES = (
    ("10002", "Fjellheimvegen 41", "2680", "Vågå", "NO", "975308626", "NO975308626MVA", None),
    ("10004", "Løvenskiolds gate 8", "0263", "Oslo", "NO", "938512744", "NO938512744MVA", "0192:938512744"),
    ("10010", "Bryggen 27", "5003", "Bergen", "NO", "994027611", None, None),
    ("10047", "Kaigaten 4", "5015", "Bergen", "NO", "964128707", "NO964128707MVA", "0192:964128707"),
    ("10048", "Fiskeriveien 12", "9750", "Honningsvåg", "NO", "991827331", "NO991827331MVA", "0192:991827331"),
    ("10049", "Speicherstadt, Am Sandtorkai 23", "20457", "Hamburg", "DE", "HRB 187654", "DE812345673",
     "9930:DE812345673"),
)
E_INVOICE_SEED = SEED + 1
# A line without VAT on the e-invoice customers' documents, once per delivery (insurance is exempt from VAT in
# Norway and Germany alike).
FREIGHT_INSURANCE = ("Transportforsikring", "Freight insurance", "185.00")
# (type, customer): a credit note and a debit note among them (an EHF CreditNote, a debit note as an invoice).
E_INVOICE_DOCUMENTS = (("INV", "10047"), ("CRM", "10047"), ("INV", "10048"), ("DRM", "10048"), ("INV", "10049"),
                       ("INV", "10049"), ("CRM", "10049"), ("INV", "10050"))
E_INVOICE_OWNERS = {c[0] for c in E_INVOICE_CUSTOMERS}
STATUS = {"10007": "CreditHold", "10026": "CreditHold", "10016": "OnHold", "10033": "OnHold",
          "10019": "Inactive", "10042": "Inactive"}
NO_EMAIL_INVOICES = ("10014", "10039")
NO_CUSTOMER_EMAIL = ("10005", "10018", "10024", "10043", "10046")
CUSTOMER_EMAIL = {"10040": "Accounts@{slug}.example"}  # the invoice contact has the same address in lower case
NO_INVOICE_CONTACT, NO_PRIMARY_CONTACT = ("10030", "10044"), ("10030",)
# Broken and hostile contact data, on purpose: (customer, slot) -> changes. Slot 0 is the invoice contact,
# slot 1 (if any) the primary contact.
CONTACT_QUIRKS = {
    ("10001", 2): {"display_name": "Lager Bølgen", "email": None, "preferred_format": None},
    ("10005", 0): {"email": None},
    ("10009", 0): {"display_name": "Ola Nordmann", "email": "ola.nordmann@"},
    ("10024", 0): {"email": "not an address"},
    ("10035", 0): {"display_name": "Jan de Vries", "email": "jan de vries@{slug}.example"},
    ("10012", 0): {"active": False},
    ("10027", 1): {"active": False},
    ("10013", 0): {"display_name": "Hanne Vik\r\nBcc: attacker@evil.example", "email": "hanne.vik@{slug}.example"},
    ("10022", 0): {"display_name": "Anna Lindqvist", "email": "anna.lindqvist@{slug}.example"},
    ("10022", 1): {"display_name": "Anna Lindqvist (inköp)", "email": "Anna.Lindqvist@{slug}.example"},
    ("10036", 1): {"preferred_format": "HTML"},
    ("10040", 0): {"display_name": "Accounts Payable", "email": "accounts@{slug}.example"},
    ("10047", 0): {"preferred_format": None},   # the mailing's EHF decides
    ("10048", 0): {"preferred_format": "EHF"},
    ("10050", 0): {"preferred_format": "EHF"},
}


class Rcpt(NamedTuple):
    contact_type: str
    contact: int | tuple[str, int] | None = None  # an employee id, or (customer, slot)
    format: str | None = None
    add_to: str = "To"
    active: bool = True


# (setting, class, email account, recipients): the class-level INVOICE mailings. INTERNAL has none.
CLASS_MAILINGS = (
    (1, "DOMESTIC", 1, (Rcpt("Invoicing"), Rcpt("Employee", BOOKKEEPING, add_to="Bcc"))),
    (2, "NORDIC", 1, (Rcpt("Invoicing"), Rcpt("Primary", add_to="Cc"))),
    (3, "EXPORT", 2, (Rcpt("Invoicing"), Rcpt("Customer", add_to="Cc"))),
)
# (setting, customer, changes to its class's row, recipients): no recipients = inherit the class's.
CUSTOMER_MAILINGS = (
    (11, "10002", {}, (Rcpt("Contact", ("10002", 1), "HTML"), Rcpt("Customer", add_to="Cc"))),
    (12, "10004", {"format": "HTML"}, ()),
    (13, "10006", {"active": False}, (Rcpt("Invoicing"),)),                   # mailing_inactive
    (14, "10008", {"report_id": "AR641099"}, ()),                             # config_error: no such template
    (15, "10023", {"email_account_id": None}, ()),                            # config_error: no account
    (16, "10025", {}, (Rcpt("Invoicing"), Rcpt("Contact", ("10021", 0), add_to="Cc"),  # foreign_contact
                       Rcpt("Employee", CREDIT_CONTROL, add_to="Cc"), Rcpt("Primary", add_to="Cc", active=False))),
    (17, "10031", {"format": "HTML"}, ()),
    (18, "10036", {}, (Rcpt("Contact", ("10036", 1)), Rcpt("Invoicing", add_to="Cc"), Rcpt("Customer", add_to="Bcc"))),
    (19, "10041", {}, (Rcpt("Primary"), Rcpt("Invoicing", format="HTML", add_to="Cc"))),
    (20, "10001", {"mailing_id": "STATEMENT", "report_id": None, "template_id": None}, (Rcpt("Customer"),)),
    (21, "10047", {"format": "EHF"}, ()),                                     # the bookkeeper's Bcc stays PDF
    (22, "10049", {}, (Rcpt("Invoicing", format="FACTURX"), Rcpt("Customer", add_to="Cc"))),
)

# (Norwegian, English, NOK list price, VAT class 0 standard / 1 food / 2 reduced, sold by weight or time)
PRODUCTS = (
    ("Kaffebønner, hele 1 kg", "Coffee beans, whole 1 kg", "289.00", 1, False),
    ("Filterkaffe, malt 500 g", "Filter coffee, ground 500 g", "119.00", 1, False),
    ("Te, Earl Grey 100 poser", "Tea, Earl Grey 100 bags", "149.00", 1, False),
    ("Sjokoladepulver 1 kg", "Drinking chocolate 1 kg", "169.00", 1, False),
    ("Havredrikk barista 1 l", "Oat drink barista 1 l", "32.90", 1, False),
    ("Brunost, Gudbrandsdalsost 500 g", "Brown cheese 500 g", "98.50", 1, False),
    ("Kanelboller, frosne 60 stk", "Cinnamon buns, frozen 60 pcs", "899.00", 1, False),
    ("Tyttebærsyltetøy 3 kg", "Lingonberry jam 3 kg", "329.00", 1, False),
    ("Knekkebrød, rug 24 pk", "Rye crispbread 24 packs", "459.00", 1, False),
    ("Røkt laks, skivet (kg)", "Smoked salmon, sliced (kg)", "389.00", 1, True),
    ("Reker, kokte og pillede (kg)", "Prawns, cooked and peeled (kg)", "279.00", 1, True),
    ("Papirkrus 25 cl, 1000 stk", "Paper cups 25 cl, 1000 pcs", "489.00", 0, False),
    ("Lokk til papirkrus, 1000 stk", "Lids for paper cups, 1000 pcs", "259.00", 0, False),
    ("Servietter hvite 33x33, 2000 stk", "Napkins white 33x33, 2000 pcs", "319.00", 0, False),
    ("Engangshansker nitril M, 100 stk", "Disposable nitrile gloves M, 100 pcs", "129.00", 0, False),
    ("Rengjøringstabletter espresso, 100 stk", "Espresso cleaning tablets, 100 pcs", "349.00", 0, False),
    ("Melkeskummer, elektrisk", "Milk frother, electric", "1290.00", 0, False),
    ("Kaffetrakter Moccamaster KBG", "Coffee brewer Moccamaster KBG", "2890.00", 0, False),
    ("Kjølevitrine, leie per måned", "Refrigerated display, monthly rent", "1950.00", 0, False),
    ("Service og opplæring (timer)", "Service and training (hours)", "950.00", 0, True),
    ("Persontransport, kundeseminar", "Passenger transport, customer seminar", "650.00", 2, False),
)
DEBIT_ITEMS = (
    ("Tilleggsfrakt, ekspress", "Additional freight, express", "450.00", 0, False),
    ("Pallegebyr, EUR-pall", "Pallet charge, EUR pallet", "195.00", 0, False),
    ("Prisjustering kaffe, oktober", "Price adjustment coffee, October", "35.00", 1, False),
)
# (type, first number, count): ~80 % invoices, ~12 % credit notes, ~8 % debit notes.
DOCUMENTS = (("INV", 101, 136), ("CRM", 45, 20), ("DRM", 12, 14))
UNRELEASED = {"INV000232": "Hold", "INV000233": "Balanced", "INV000234": "Hold", "INV000235": "Hold",
              "INV000236": "Balanced", "CRM000064": "Balanced"}
VOIDED = ("INV000140", "INV000190")
DONT_EMAIL = ("INV000112", "INV000175", "CRM000055", "DRM000020")
EMAILED = ("INV000102", "INV000104", "INV000107", "INV000111", "INV000118", "CRM000046")
# Showcase documents: always Open, never emailed, released in the last week (whatever their number says).
PINNED = {"INV000150": "10017", "INV000228": "10003", "INV000230": "10010"}
SCRIPT_DESCRIPTION = ("INV000228", '<script>alert("x")</script> Levering & montering')
LONG_DOCUMENT = ("INV000150", 40)
BIG_DOCUMENT = ("INV000230", (("Kjølerom, komplett installasjon", "1", "987654.31", "25"),
                              ("Frakt og montering, Bergen–Tromsø", "1", "12500.00", "25")))


LEGAL_FORMS = ("as", "ab", "aps", "oy", "bv", "vof", "ltd", "gmbh")


def slug(name: str) -> str:
    """``Bølgen Kafé AS`` -> ``bolgen-kafe``: the company's mail domain, without markup or legal form."""
    text = re.sub(r"<[^>]*>", " ", name).replace(".", "").replace("A/S", "AS").lower()
    text = unicodedata.normalize("NFKD", text.replace("æ", "ae").replace("ø", "o").replace("ß", "ss")).encode(
        "ascii", "ignore")
    return "-".join(w for w in re.findall(r"[a-z0-9]+", text.decode()) if w not in LEGAL_FORMS)


def mailbox(person: str) -> str:
    """``Kari Nordmann`` -> ``kari.nordmann``; ``Anouk de Vries`` -> ``anouk.devries``."""
    first, _, last = person.partition(" ")
    return ".".join(slug(part).replace("-", "") for part in (first, last))


def _needed_contacts() -> dict[str, int]:
    """How many contacts a customer needs at least, for the quirks and mailings that name its slots."""
    slots = list(CONTACT_QUIRKS)
    slots += [r.contact for *_, recipients in CUSTOMER_MAILINGS for r in recipients if isinstance(r.contact, tuple)]
    needed: dict[str, int] = {}
    for customer_id, slot in slots:
        needed[customer_id] = max(needed.get(customer_id, 1), slot + 1)
    return needed


def _people(rng: random.Random, customer_id: str, name: str, locale: str, count: int) -> list[dict]:
    market, domain = MARKETS[locale], slug(name)
    people = []
    for slot in range(count):
        person = f"{rng.choice(market.first_names)} {rng.choice(market.last_names)}"
        row = dict(customer_id=customer_id, display_name=person, email=f"{mailbox(person)}@{domain}.example",
                   preferred_format=rng.choices((None, "PDF", "HTML"), (70, 22, 8))[0], is_employee=False, active=True)
        row.update(CONTACT_QUIRKS.get((customer_id, slot), {}))
        if row["email"]:
            row["email"] = row["email"].replace("{slug}", domain)
        people.append(row)
    return people


def _business_moment(rng: random.Random, as_of: date, within: int = 45) -> datetime:
    """A release time on a weekday between ``within`` days and 1 day before ``as_of``, in office hours."""
    days = [as_of - timedelta(days=n) for n in range(1, within + 1)]
    day = rng.choice([d for d in days if d.weekday() < 5])
    return datetime.combine(day, time(rng.randint(8, 15), rng.randint(0, 59), rng.randint(0, 59)))


def _lines(rng: random.Random, doc_type: str, ref_nbr: str, locale: str, country: str) -> list[tuple]:
    """(description, quantity, unit price, VAT rate) of one document, in its currency and language."""
    if ref_nbr == BIG_DOCUMENT[0]:
        return [tuple(Decimal(v) if i else v for i, v in enumerate(line)) for line in BIG_DOCUMENT[1]]
    if ref_nbr == LONG_DOCUMENT[0]:
        items = [rng.choice(PRODUCTS) for _ in range(LONG_DOCUMENT[1])]
    elif doc_type == "DRM":
        items = rng.sample(DEBIT_ITEMS, rng.randint(1, 2))
    else:
        count = rng.randint(1, 3) if doc_type == "CRM" else rng.choices(range(1, 9), (4, 5, 5, 4, 3, 2, 1, 1))[0]
        items = rng.sample(PRODUCTS, count)
    return _priced(rng, items, locale, country)


def _e_invoice_lines(rng: random.Random, doc_type: str, locale: str, country: str) -> list[tuple]:
    """Lines that exercise an e-invoice's VAT breakdown: every rate of the market and 0, and a quantity by
    weight or time (fractional)."""
    if doc_type == "DRM":
        return _priced(rng, DEBIT_ITEMS, locale, country) + [_insurance(locale, country)]
    by_class = [rng.choice([p for p in PRODUCTS if p[3] == vat_class and not p[4]]) for vat_class in (0, 1, 2)]
    by_measure = rng.choice([p for p in PRODUCTS if p[4]])
    if doc_type == "CRM":
        return _priced(rng, [by_class[0], by_measure], locale, country)
    return _priced(rng, [*by_class, by_measure], locale, country) + [_insurance(locale, country)]


def _insurance(locale: str, country: str) -> tuple:
    norwegian, english, price = FREIGHT_INSURANCE
    market = MARKETS[country]
    return (english if locale in ENGLISH_ITEMS else norwegian, Decimal(1),
            (Decimal(price) * market.fx).quantize(CENT, ROUND_HALF_UP), Decimal(0))


def _priced(rng: random.Random, items, locale: str, country: str) -> list[tuple]:
    """(description, quantity, unit price, VAT rate) of the items, in the country's currency and rates."""
    market = MARKETS[country]
    lines = []
    for norwegian, english, price, vat_class, by_measure in items:
        unit_price = (Decimal(price) * market.fx * rng.randint(95, 105) / 100).quantize(CENT, ROUND_HALF_UP)
        if by_measure:
            quantity = Decimal(rng.randint(50, 1200)) / 100
        else:
            quantity = Decimal(rng.randint(1, 3) if Decimal(price) >= 1000 else rng.randint(1, 24))
        text = english if locale in ENGLISH_ITEMS else norwegian
        lines.append((text, quantity, unit_price, Decimal(market.vat[vat_class])))
    return lines


def vat_per_rate(lines: list[tuple[Decimal, Decimal]]) -> Decimal:
    """The document's VAT from its (amount, rate) lines: each rate's basis times the rate, rounded half up once
    per rate (EN 16931 BR-CO-17), as an ERP computes tax per tax category on the document. Rounding per line
    instead can differ by a cent per line, and an e-invoice whose VAT disagrees with its lines is refused."""
    basis: dict[Decimal, Decimal] = {}
    for amount, rate in lines:
        basis[rate] = basis.get(rate, Decimal(0)) + amount
    return sum(((total * rate / 100).quantize(CENT, ROUND_HALF_UP) for rate, total in basis.items()), Decimal(0))


def seed(engine: Engine, *, as_of: date = AS_OF) -> dict:
    """Create (or empty) the ERP tables and fill them with the demo company; the same rows every time."""
    if inspect(engine).has_table("customer"):
        with engine.begin() as conn:
            source.customer_address.create(conn, checkfirst=True)  # a demo ERP seeded before the table came
            for table in TABLES:
                conn.execute(delete(table))
    else:
        source.create_erp_schema(engine)
    rng, e_rng = random.Random(SEED), random.Random(E_INVOICE_SEED)
    rows: dict[str, list[dict]] = {table.name: [] for table in TABLES}

    rows["customer_class"] = [dict(class_id=c, description=d) for c, d in CLASSES]
    rows["email_account"] = [dict(account_id=i, address=a, display_name=n, smtp_conn_id=None) for i, a, n in ACCOUNTS]
    rows["report"] = [dict(report_id=r, description=d, template_name=t) for r, d, t in REPORTS]
    for locale, (subject, *body) in TEMPLATE_TEXTS.items():
        greeting, attached, due, reference, questions, regards = body
        html = (f"<p>{greeting}</p>\n<p>{attached}</p>\n"
                f"{{% if document.due_date %}}<p>{due}</p>\n{{% endif %}}"
                f"{{% if document.customer_ref %}}<p>{reference}</p>\n{{% endif %}}"
                f"<p>{questions}</p>\n<p>{regards}<br>{{{{ sender.name or company.name }}}}</p>\n")
        rows["notification_template"].append(dict(template_id=TEMPLATE_ID, locale=locale, subject=subject,
                                                  body_html=html))

    # Contacts: the company's own employees, then 1-3 people per customer.
    rows["contact"] = [dict(contact_id=i, customer_id=None, display_name=n, email=e, preferred_format="PDF",
                            is_employee=True, active=True) for i, n, e in EMPLOYEES]
    contacts_of: dict[str, list[int]] = {}
    needed = _needed_contacts()
    for customer_id, name, class_id, locale in CUSTOMERS + E_INVOICE_CUSTOMERS:
        stream = e_rng if customer_id in E_INVOICE_OWNERS else rng
        count = max(stream.randint(1, 3), needed.get(customer_id, 1))
        for person in _people(stream, customer_id, name, locale, count):
            contact_id = 101 + len(rows["contact"]) - len(EMPLOYEES)
            rows["contact"].append(dict(contact_id=contact_id, **person))
            contacts_of.setdefault(customer_id, []).append(contact_id)
        ids = contacts_of[customer_id]
        email = CUSTOMER_EMAIL.get(customer_id, f"{MARKETS[locale].mailbox}@{{slug}}.example")
        rows["customer"].append(dict(
            customer_id=customer_id, name=name, class_id=class_id, status=STATUS.get(customer_id, "Active"),
            locale=locale, email=None if customer_id in NO_CUSTOMER_EMAIL else email.replace("{slug}", slug(name)),
            primary_contact_id=None if customer_id in NO_PRIMARY_CONTACT else ids[min(1, len(ids) - 1)],
            invoice_contact_id=None if customer_id in NO_INVOICE_CONTACT else ids[0],
            send_invoices_by_email=customer_id not in NO_EMAIL_INVOICES))
    rows["customer_address"] = [dict(customer_id=c, street=street, postal_code=postal_code, city=city, country_code=cc,
                                     org_number=org, vat_number=vat, peppol_id=peppol)
                                for c, street, postal_code, city, cc, org, vat, peppol in ADDRESSES]

    # Mailing settings: one INVOICE row per class, then the customers' own rows.
    def add_recipients(setting_id: int, recipients: tuple[Rcpt, ...]) -> None:
        for r in recipients:
            contact_id = contacts_of[r.contact[0]][r.contact[1]] if isinstance(r.contact, tuple) else r.contact
            rows["mailing_recipient"].append(dict(
                recipient_id=len(rows["mailing_recipient"]) + 1, setting_id=setting_id, contact_type=r.contact_type,
                contact_id=contact_id, format=r.format, add_to=r.add_to, active=r.active))

    class_rows = {}
    for setting_id, class_id, account_id, recipients in CLASS_MAILINGS:
        class_rows[class_id] = dict(setting_id=setting_id, class_id=class_id, customer_id=None, mailing_id="INVOICE",
                                    email_account_id=account_id, report_id="AR641000", template_id=TEMPLATE_ID,
                                    format="PDF", active=True)
        rows["mailing_setting"].append(class_rows[class_id])
        add_recipients(setting_id, recipients)
    class_of = {c[0]: c[2] for c in CUSTOMERS + E_INVOICE_CUSTOMERS}
    for setting_id, customer_id, changes, recipients in CUSTOMER_MAILINGS:
        rows["mailing_setting"].append({**class_rows[class_of[customer_id]], "setting_id": setting_id, "class_id": None,
                                        "customer_id": customer_id, **changes})
        add_recipients(setting_id, recipients)

    # Documents: numbered in release order per type. Each customer owns one of the latest plain documents,
    # so that a run with a 30-day look-back meets every case; the rest go to customers by their size.
    documents = []
    for doc_type, first, count in DOCUMENTS:
        moments = sorted(_business_moment(rng, as_of) for _ in range(count))
        documents += [(doc_type, f"{doc_type}{first + i:06d}", _business_moment(rng, as_of, 7)
                       if f"{doc_type}{first + i:06d}" in PINNED else moment) for i, moment in enumerate(moments)]
    special = {*PINNED, *UNRELEASED, *VOIDED, *DONT_EMAIL, *EMAILED}
    latest = sorted((d for d in documents if d[1] not in special), key=lambda d: d[2], reverse=True)
    customer_ids = [c[0] for c in CUSTOMERS]
    owner = dict(zip([d[1] for d in latest[:len(customer_ids)]], rng.sample(customer_ids, len(customer_ids)),
                     strict=True)) | PINNED
    rest = [ref_nbr for _, ref_nbr, _ in documents if ref_nbr not in owner]
    weights = [rng.randint(1, 6) for _ in customer_ids]
    owner |= dict(zip(rest, rng.choices(customer_ids, weights, k=len(rest)), strict=True))
    by_id = {c[0]: c for c in CUSTOMERS + E_INVOICE_CUSTOMERS}
    for doc_type, ref_nbr, moment in documents:
        customer = by_id[owner[ref_nbr]]
        _add_document(rows, rng, doc_type, ref_nbr, moment, customer, as_of,
                      _lines(rng, doc_type, ref_nbr, customer[3], _market(customer)))
    # The e-invoice customers' documents: numbered on from the rest, released after them on the last working day.
    last_day = max(d for d in (as_of - timedelta(days=n) for n in range(1, 8)) if d.weekday() < 5)
    numbers = {doc_type: first + count for doc_type, first, count in DOCUMENTS}
    for minute, (doc_type, customer_id) in enumerate(E_INVOICE_DOCUMENTS):
        customer = by_id[customer_id]
        ref_nbr, numbers[doc_type] = f"{doc_type}{numbers[doc_type]:06d}", numbers[doc_type] + 1
        _add_document(rows, e_rng, doc_type, ref_nbr, datetime.combine(last_day, time(16, minute * 7)), customer,
                      as_of, _e_invoice_lines(e_rng, doc_type, customer[3], _market(customer)))

    with engine.begin() as conn:
        for table in reversed(TABLES):
            if rows[table.name]:
                conn.execute(insert(table), rows[table.name])
    return {table.name: len(rows[table.name]) for table in reversed(TABLES)}


def _market(customer: tuple) -> str:
    """The market a customer is invoiced in: Norway for domestic customers whatever their language."""
    return "nb_NO" if customer[2] in ("DOMESTIC", "INTERNAL") else customer[3]


def _add_document(rows: dict[str, list[dict]], rng: random.Random, doc_type: str, ref_nbr: str, moment: datetime,
                  customer: tuple, as_of: date, lines: list[tuple]) -> None:
    """The invoice row and its lines. Each line's amount is quantity x unit price rounded to the cent, and the
    VAT is computed per rate on the document (``vat_per_rate``), as the e-invoice rules check them."""
    customer_id, _, class_id, locale = customer
    country = _market(customer)
    lines = [(text, qty, price, rate, (qty * price).quantize(CENT, ROUND_HALF_UP)) for text, qty, price, rate in lines]
    net = sum((line[4] for line in lines), Decimal(0))
    vat = vat_per_rate([(amount, rate) for *_, rate, amount in lines])
    age = (as_of - moment.date()).days
    status = UNRELEASED.get(ref_nbr) or ("Voided" if ref_nbr in VOIDED else "Open" if ref_nbr in PINNED else
                                         "Closed" if rng.random() < (0.6 if age > 20 else 0.1) else "Open")
    doc_date = moment.date() - timedelta(days=1 if rng.random() < 0.25 else 0)
    terms = 14 if class_id in ("DOMESTIC", "INTERNAL") else 30
    wording = MARKETS[locale].texts[("INV", "CRM", "DRM").index(doc_type)]
    rows["invoice"].append(dict(
        doc_type=doc_type, ref_nbr=ref_nbr, customer_id=customer_id, status=status,
        released_at=None if ref_nbr in UNRELEASED else moment, doc_date=doc_date,
        due_date=None if doc_type == "CRM" else doc_date + timedelta(days=terms),
        currency=MARKETS[country].currency,
        amount=net + vat, vat_amount=vat,
        description=SCRIPT_DESCRIPTION[1] if ref_nbr == SCRIPT_DESCRIPTION[0] else
        wording.format(week=doc_date.isocalendar()[1]),
        customer_ref=f"PO-{rng.randint(1000, 9999)}" if rng.random() < 0.6 else None,
        dont_email=ref_nbr in DONT_EMAIL, emailed=ref_nbr in EMAILED))
    rows["invoice_line"] += [
        dict(doc_type=doc_type, ref_nbr=ref_nbr, line_nbr=n, description=text, quantity=quantity,
             unit_price=price, vat_rate=rate, amount=amount)
        for n, (text, quantity, price, rate, amount) in enumerate(lines, start=1)]


# --- make demo: seed, run the DAG once against a local SMTP sink, show what was sent -----------------

def run_demo(folder: Path, as_of: date = AS_OF) -> int:
    """One DAG run with ``airflow dags test`` on the embedded ERP; the mail lands in ``folder/outbox``."""
    from dev.smtp_sink import SmtpSink

    folder = folder.resolve()
    erp_path, ledger_path, outbox = folder / "erp.db", folder / "ledger.db", folder / "outbox"
    if not erp_path.exists():
        main(["seed", "--erp", str(erp_path), "--as-of", as_of.isoformat()])
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "AIRFLOW_HOME": str(folder / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(root / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{folder / 'airflow' / 'airflow.db'}",
        "AIRFLOW_CONN_ERP_DB": json.dumps({"conn_type": "sqlite", "host": str(erp_path)}),
        "AIRFLOW_CONN_MAILING_LEDGER": json.dumps({"conn_type": "sqlite", "host": str(ledger_path)}),
    }
    airflow = [sys.executable, "-m", "airflow"]
    log_path = folder / "dags-test.log"
    before = set(outbox.glob("*.eml")) if outbox.exists() else set()
    with SmtpSink(directory=outbox) as sink, log_path.open("w") as log_file:
        env["AIRFLOW_CONN_SMTP_DEFAULT"] = json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": sink.port,
            "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10}})
        print(f"SMTP sink on 127.0.0.1:{sink.port}; running: airflow dags test invoice_mailing {as_of}", flush=True)
        subprocess.run([*airflow, "db", "migrate"], env=env, check=True, stdout=log_file, stderr=subprocess.STDOUT)
        done = subprocess.run([*airflow, "dags", "test", "invoice_mailing", as_of.isoformat()], env=env,
                              stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode != 0 and not ledger_path.exists():
        print(log_path.read_text()[-4000:])
        print(f"The DAG run failed; the whole log is in {log_path}")
        return done.returncode
    new_mail = sorted(set(outbox.glob("*.eml")) - before)
    report(ledger_path, outbox, new_mail, log_path)
    if done.returncode != 0:
        print("\nThe run ended failed (a red night): the 'failed' rows above need an operator (the demo ERP is "
              "broken on purpose); in production the mailing_alerts connection would have been mailed.")
    return 0


def report(ledger_path: Path, outbox: Path, new_mail: list[Path], log_path: Path) -> None:
    """Print the run's summary by status and reason, and where its emails and attachments are."""
    from email import message_from_bytes, policy

    from include.invoice_mailing import ledger

    engine = create_engine(f"sqlite:///{ledger_path}")
    with engine.connect() as conn:
        run = conn.execute(select(ledger.mailing_run).order_by(ledger.mailing_run.c.started_at.desc())).first()
        runs = conn.execute(select(func.count()).select_from(ledger.mailing_run)).scalar_one()
    summary = (run.summary if run is not None else None) or {"rows": [], "by_status": {}}
    print(f"\nRun {run.run_id if run else '?'}: what the ledger recorded")
    print(f"  {'status':<9} {'reason':<20} {'deliveries':>10} {'documents':>9}")
    for row in summary["rows"]:
        print(f"  {row['status']:<9} {row['reason'] or '-':<20} {row['deliveries']:>10} {row['documents']:>9}")
    deliveries = ledger.all_deliveries(engine, ledger.delivery.c.last_run_id == run.run_id) if run else []
    print(formats_sent(deliveries), end="")
    print(failures(deliveries), end="")
    # A Factur-X PDF keeps the plain PDF's name: the e-invoices go to a folder per format, by the ledger's format
    # of the message that carried them.
    format_of = {row["message_id"]: row["format"] for row in deliveries if row["message_id"]}
    attachments = outbox / "attachments"
    attachments.mkdir(parents=True, exist_ok=True)
    kinds: Counter[str] = Counter()
    for path in new_mail:
        message = message_from_bytes(path.read_bytes(), policy=policy.default)
        fmt = format_of.get((message["Message-ID"] or "").strip(), "")
        folder = attachments / fmt if fmt in E_INVOICE_FORMATS else attachments
        folder.mkdir(exist_ok=True)
        for part in message.iter_attachments():
            content = part.get_content()
            (folder / part.get_filename()).write_bytes(content.encode() if isinstance(content, str) else content)
            kinds[fmt or Path(part.get_filename()).suffix.lstrip(".").upper()] += 1
    if kinds:
        print("\nAttachments by format: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
              + "".join(f"\n  {fmt}: {attachments / fmt}" for fmt in E_INVOICE_FORMATS if kinds[fmt]))
    sent = summary["by_status"].get("sent", 0)
    if not new_mail and runs > 1:
        print("\nNothing was sent this time: every due document was delivered by an earlier run "
              f"({runs} runs in the ledger). Delete demo/ (make clean) to start afresh.")
    else:
        print(f"\n{len(new_mail)} emails ({sent} deliveries) arrived at the local SMTP sink.")
    print(f"  emails (.eml):  {outbox}\n  attachments:    {attachments}\n  ledger:         {ledger_path}"
          f"\n  Airflow log:    {log_path}")
    print(f"\nAuditors' pages (the invoice_mailing_audit plugin): run `make audit-ui`, then open {AUDIT_URL}\n"
          f"  (login admin; `make audit-ui` prints the password)")


def formats_sent(deliveries: list[dict]) -> str:
    """Per format, how many deliveries were sent and how many failed: the e-invoice formats beside PDF and HTML."""
    by_format: dict[str, Counter[str]] = {}
    for row in deliveries:
        if row["format"]:
            by_format.setdefault(row["format"], Counter())[row["status"]] += 1
    if not by_format:
        return ""
    lines = ["\nBy format (the recipient's row, else the contact's preference, else the mailing's)",
             f"  {'format':<9} {'sent':>6} {'failed':>6}"]
    lines += [f"  {fmt:<9} {counts['sent']:>6} {counts['failed']:>6}" for fmt, counts in sorted(by_format.items())]
    return "\n".join(lines) + "\n"


def failures(deliveries: list[dict], width: int = 110) -> str:
    """Each failed delivery with its reason and the ledger's detail whole, wrapped to ``width``: the words that
    say what to fix (an e-invoice rule, the missing row) come last and are never cut off."""
    failed = [row for row in deliveries if row["status"] == "failed"]
    if not failed:
        return ""
    lines = ["\nFailed, and why (the ledger's detail)"]
    for row in failed:
        head = f"  {row['customer_id']} {row['ref_nbr']} {row['format'] or '-'} {row['reason']}: "
        detail = " ".join((row["detail"] or row["last_error"] or "").split())
        lines += textwrap.wrap(head + detail, width, subsequent_indent="      ", break_long_words=False,
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.invoice_mailing.demo", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    seed_cmd = commands.add_parser("seed", help="create or overwrite a SQLite file with the demo ERP")
    seed_cmd.add_argument("--erp", type=Path, required=True, help="the SQLite file, e.g. demo/erp.db")
    seed_cmd.add_argument("--as-of", type=date.fromisoformat, default=AS_OF, help="the run date (YYYY-MM-DD)")
    run_cmd = commands.add_parser("run", help="seed demo/ if needed, run the DAG once, show what was sent")
    run_cmd.add_argument("--dir", type=Path, default=Path("demo"), help="where the demo keeps its files")
    run_cmd.add_argument("--as-of", type=date.fromisoformat, default=AS_OF, help="the run date (YYYY-MM-DD)")
    args = parser.parse_args(argv)
    if args.command == "run":
        return run_demo(args.dir, args.as_of)
    args.erp.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(f"sqlite:///{args.erp}")
    try:
        counts = seed(engine, as_of=args.as_of)
    finally:
        engine.dispose()
    print(f"Seeded {args.erp} as of {args.as_of}: " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
