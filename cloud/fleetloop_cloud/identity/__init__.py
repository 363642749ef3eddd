"""Who may do what, and the record of what was done: roles per operator action, API tokens, and the
hash chain that makes the audit log tamper-evident. Pure: no I/O, time passed in."""
