"""`python -m bench`: run the benchmark harness (see bench.harness for the options)."""
import sys

from .harness import main

sys.exit(main())
