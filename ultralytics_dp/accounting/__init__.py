"""What a run spends, in numpy and scipy alone: the privacy loss distribution accountant (``pld``),
the plan of a run (``planning``: sigma, steps, budgets) and the write-ahead ledger across runs
(``ledger``). Never imports torch or Ultralytics (``tests/test_layers.py``).
"""
