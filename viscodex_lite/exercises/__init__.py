"""The checks of the notebooks' exercises, one module per notebook: ``nbNN.py`` for notebook NN.

Each check is a function ``fn(answer, **context)`` registered with
``@viscodex_lite.check.checker("NN.k", hint=...)``. It computes the expected result from the
context the notebook passes (never from a stored answer), calls ``require(condition, hint)`` for
each thing a right answer must satisfy, and may return a short detail shown on a pass.
``vl.check.exercise("NN.k", answer, **context)`` imports the module on first use.
"""
