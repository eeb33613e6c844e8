"""`python -m benchmarks.report`: the same as `djinn-report`."""
from benchmarks.report import main

raise SystemExit(main())
