"""Request-level parts both backends share.

``params`` checks sampling arguments, ``prompt`` turns a prompt into checked token ids,
``text`` assembles reply text (UTF-8 and stop strings), ``job`` is one generation and the
channel its text travels in, ``jobs`` the table of queued and running jobs, and ``stream`` the
iterators callers read replies from.
"""
