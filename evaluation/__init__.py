"""Evaluation suite: retrieval (BEIR layout), ESCI re-ranking, STS, frozen-feature probes and mteb tasks.

Run it as ``python -m evaluation.run --model M --task T --output results.json``; the Python entry point is
:func:`evaluation.run.evaluate`.
"""
