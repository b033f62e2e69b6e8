"""Benchmarks of provbridge: the end-to-end harness (`python -m bench.run`), its load generator and
null responder, the seeding helper, and the claim-path micro-suite. Not part of the installed package;
`make bench` and `make bench-quick` run it. See docs/BENCHMARKS.md.
"""
