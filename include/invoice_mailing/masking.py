"""One masker for recipient addresses, wherever a reader without edit access sees them: k***@bolgen.example.

Used by the audit pages and exports for viewers, the operators' alert mail, and the task log lines
and exception texts of deliveries not sent. The ledger and the owners' export files keep the
addresses whole.
"""

from __future__ import annotations

import re

# An address inside free text (a server's answer often quotes it): a local part, quoted or not, then
# a domain, both in any script and the domain with or without a dot (``<åse@bølgen.no>``,
# ``<ola@intranet>``, ``<"ola nordmann"@[10.0.0.1]>``). Wider than RFC 5322 on purpose: hiding a
# little too much is harmless, showing an address is not.
_STOP = r"\s<>()\[\]\\,;:\"@"
ADDRESS = re.compile(rf"(?:\"[^\"\r\n]*\"|[^{_STOP}]+)@(?:\[[^\]\s]*\]|[^{_STOP}]+)")


def mask_address(address: str | None) -> str | None:
    """``kari@bolgen.example`` -> ``k***@bolgen.example``: enough to recognise, not enough to leak.

    A value without an ``@`` is what the ERP's recipient row names instead ("Invoicing", "contact 17")
    and is kept; empty stays empty.
    """
    if not address or "@" not in address:
        return address
    local, _, domain = address.rpartition("@")
    if local.startswith('"'):  # a quoted local part stays quoted
        return f'"{local[1:2]}***"@{domain}'
    return f"{local[:1]}***@{domain}"


def mask_text(text: str | None) -> str | None:
    """Mask every address inside free text: ``550 5.1.1 <åse@bølgen.no>: user unknown`` -> ``<å***@bølgen.no>``."""
    return ADDRESS.sub(lambda m: mask_address(m.group(0)), text) if text else text
