"""Running and reporting: ``distill()``, plain models and data made ready for a ``Trainer``, the ``Trainer`` builder,
the search on validation and the end-of-run summaries.
"""
