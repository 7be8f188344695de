"""The k4trt benchmark harness: every backend (and the original) measured the same way, in one run.

`k4trt bench --help`; `k4trt bench-compare` checks a result against the committed ones. See
benchmarks/README.md in the checkout for what is measured and how, and NOTES.md for the optimisation log.
"""
