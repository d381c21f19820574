"""Invoice mailing: mail released ERP invoices to the right people, exactly once, with an audit trail."""
