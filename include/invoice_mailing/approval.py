"""``approve_night``: the approval brake as an Airflow task (the standard provider's ApprovalOperator).

A normal night passes straight through: the task finds no reason to wait (``brake.compare``), logs
tonight's numbers against the median, and succeeds. A night that must wait asks in Airflow's Browse →
Required Actions, with the numbers; the answer comes back to ``execute_complete``:

- Approve: recorded in the ledger (who, when, which numbers); the night goes on.
- Reject, or no answer within ``INVOICE_MAILING_BRAKE_TIMEOUT`` (the default answer is Reject): recorded
  in the ledger; the task fails, so nothing is mailed (``mail_customers`` is upstream_failed) and the
  night ends red; the DAG's failure alert says who rejected it, or that nobody answered.

Parsed by the dag-processor: only Airflow and ``dag_settings`` are imported here, the rest in the methods.
"""

from __future__ import annotations

from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator, HITLOperator

from include.invoice_mailing.dag_settings import brake_timeout


class NightApproval(ApprovalOperator):
    def __init__(self, **kwargs) -> None:
        super().__init__(subject="Invoice mailing: approve tonight's mailing?", defaults=self.REJECT,
                         response_timeout=brake_timeout(), **kwargs)

    def execute(self, context) -> Any:
        from include.invoice_mailing import tasks

        ti = context["ti"]
        with tasks.failure_recorded(ti):
            question = tasks.hold_night(run_id=context["run_id"], logical_date=context.get("logical_date"),
                                        data_interval_end=context.get("data_interval_end"), params=context["params"])
        if question is None:
            return {"decision": "not needed"}
        self.subject, self.body = question
        return super().execute(context)  # waits in Airflow's awaiting_input state for the answer

    def execute_complete(self, context, event: dict[str, Any]) -> Any:
        """The answer (or the timeout's default): recorded; Reject fails the night. ApprovalOperator's own
        handling of Reject (skip what follows, the run green) is not used: a rejected night is red."""
        from airflow.sdk.exceptions import AirflowFailException

        from include.invoice_mailing import tasks

        with tasks.failure_recorded(context["ti"]):
            answer = HITLOperator.execute_complete(self, context=context, event=event)
            approved = answer["chosen_options"] == [self.APPROVE]
            said = tasks.night_decided(run_id=context["run_id"], approved=approved,
                                       timed_out=bool(event.get("timedout")),
                                       responded_by=answer.get("responded_by_user"),
                                       responded_at=answer.get("responded_at"))
            if not approved:
                raise AirflowFailException(said)
        self.log.info("%s", said)
        return {"decision": "approved", "said": said}
