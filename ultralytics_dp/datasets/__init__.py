"""Embedded data for examples, tests and benchmarks: the private handwritten digits and the public
typeset and pen-written ones (``embedded``, ``font_digits``, ``pen_digits``), and the public
models trained on them (``public_weights``). Never imports the DP engine.
"""
