"""Audits: run defenses (and attacks) over a data set, write one row per input, summarize the rows.

Summaries are pure functions of rows (lists of dicts as written by :class:`certaudit.results.RowWriter`),
so a report can be recomputed from a results file at any radius without running anything again.
"""
