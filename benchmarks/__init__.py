"""The k4trt benchmark harness: every backend (and the original) measured the same way, in one run.

`python -m benchmarks --help` or `k4trt bench --help`; `python -m benchmarks.compare` checks a result against
the committed ones. See README.md here for what is measured and how, NOTES.md for the optimisation log.
"""
