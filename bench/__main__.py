"""`python -m bench`: run the benchmark harness (see bench.harness for the options)."""
import sys

from bench.harness import main

sys.exit(main())
