"""`python -m benchmarks [...]`: the same command as `k4trt bench`."""

import sys

from benchmarks.cli import main

sys.exit(main())
