"""Step 2a, plan: each document of a batch decided by the rules, and the ledger rows its decision makes."""

from __future__ import annotations

from include.invoice_mailing import rules, source
from include.invoice_mailing.ledger import PENDING, PlannedDelivery
from include.invoice_mailing.render import Renderer


def plan_batch(data: source.BatchData, renderer: Renderer, *, include_emailed: bool = False
               ) -> list[rules.DocumentPlan]:
    template_ids = {template_id for template_id, _ in data.templates}
    plans = []
    for document in data.documents:
        gone = rules.still_due(document, include_emailed=include_emailed)
        if gone:  # the ERP changed since the night's extract: voided, "don't email", emailed by hand
            plans.append(rules.DocumentPlan(document, refusal=gone))
            continue
        customer = data.customers.get(document.customer_id)
        plan = rules.plan_document(
            document, customer,
            data.customer_settings.get(document.customer_id),
            data.class_settings.get(customer.class_id) if customer else None,
            data.contacts, data.accounts, data.reports, template_ids,
        )
        if plan.mailing and customer and not (
            (plan.mailing.template_id, customer.locale) in data.templates
            or (plan.mailing.template_id, "") in data.templates
        ):
            plan.refusal = rules.Refusal(
                rules.CONFIG_ERROR,
                f"notification template {plan.mailing.template_id!r} has no text for locale {customer.locale!r} "
                "and no default ('') text", "failed")
        elif plan.mailing and not renderer.has_report(plan.mailing.report.template_name):
            report = plan.mailing.report
            plan.refusal = rules.Refusal(
                rules.CONFIG_ERROR,
                f"report {report.report_id} of mailing setting {plan.mailing.setting.setting_id} names template "
                f"{report.template_name!r}, which does not exist", "failed")
        if plan.recipients and not plan.refusal and document.customer_id not in data.addresses:
            plan.note = (f"without the buyer's address: the ERP has no customer_address row for customer "
                         f"{document.customer_id}")
        plans.append(plan)
    return plans


def planned_deliveries(plan: rules.DocumentPlan) -> list[PlannedDelivery]:
    """The ledger rows of one document's plan: one per recipient and format, or one for the whole document."""
    doc = plan.document
    base = dict(doc_type=doc.doc_type, ref_nbr=doc.ref_nbr, customer_id=doc.customer_id,
                mailing_id=source.INVOICE_MAILING)
    rows = [
        PlannedDelivery(**base, recipient=r.recipient, add_to="", format=r.format, status=r.refusal.status,
                        reason=r.refusal.reason, detail=r.refusal.detail)
        for r in plan.refused_recipients
    ]
    if plan.refusal:
        rows.append(PlannedDelivery(**base, recipient="", add_to="", format="", status=plan.refusal.status,
                                    reason=plan.refusal.reason, detail=plan.refusal.detail))
        return rows
    account = plan.mailing.account
    for r in plan.recipients:
        rows.append(PlannedDelivery(**base, recipient=r.address, add_to=r.add_to, format=r.format, status=PENDING,
                                    sender=account.address, sender_domain=account.address.rpartition("@")[2],
                                    recipient_key=r.key, detail=plan.note))
    return rows
