"""The quality suite's command line: CoMP vs single-mode and naive joint pruning on the offline benchmark world,
paired seeds. The suite is the package ``quality_suite`` next to this script (its docstring says what a run
records and how the suite resumes).

    python benchmarks/quality.py --smoke                 # minutes: tiny everything, writes to /tmp
    python benchmarks/quality.py                         # the suite (hours on 2 CPU cores)
    python benchmarks/quality.py --report                # tables + plots from the recorded runs
"""

from quality_suite.run import main

if __name__ == "__main__":
    raise SystemExit(main())
