"""Speed and memory benchmarks against the real peers, measured in the same run.

``python -m benchmarks [--suite core|client|daemon|all] [--runs 3] [--files 5000]
[--megabytes 200] [--json FILE]`` prints, per suite, a table of our figure, the
peer's, their ratio, the target and PASS/MISS.  A missed target never fails the
command; a measurement that could not be made does (exit status 1).

Targets live here, never in unit tests: timings on a shared 2-core machine are
too noisy to gate a test run on.
"""
