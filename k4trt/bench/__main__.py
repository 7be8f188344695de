"""`python -m k4trt.bench [...]`: the same command as `k4trt bench`."""

import sys

from k4trt.bench.cli import main

sys.exit(main())
