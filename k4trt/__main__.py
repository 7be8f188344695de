import sys

from k4trt.cli.main import main

sys.exit(main())
