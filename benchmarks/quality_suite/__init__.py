"""The quality suite: CoMP vs single-mode and naive joint pruning on the offline benchmark world, paired seeds.

One search per (arm, seed) passes through every requested ratio (snapshots), each snapshot fine-tuned and
evaluated; every finished run appends its records to ``benchmarks/results/quality.json`` (a list of flat records)
and its stage log to ``quality_stages.jsonl``. Every record names what produced it: the world, model, task and
bench settings, the git commit, and the full PruneConfig. A *suite* is the set of runs that share all of that
except the arm-level fields (strategy, seed, the arm's own options, the unit-selection rule); its key is a short
hash. A restart skips a run whose (suite, arm label, seed) is recorded, so the suite can run in the background
across sessions, and arms are paired by seed only within one suite. ``--report`` renders the markdown tables
(means, mean paired differences vs comp with 95% CIs) and the PNG plots per suite from whatever is recorded;
records written before the suite keys form the suite ``legacy``.

    python benchmarks/quality.py --smoke                 # minutes: tiny everything, writes to /tmp
    python benchmarks/quality.py                         # the suite (hours on 2 CPU cores)
    python benchmarks/quality.py --set distill=0.5       # every arm with that PruneConfig field changed
    python benchmarks/quality.py --strategies comp,old,old+tokens   # the search fixes one at a time
    python benchmarks/quality.py --report                # tables + plots from the recorded runs
    python benchmarks/quality.py --report --out benchmarks/results/before   # the results before the search fixes

The package's modules: ``arms`` (the arm catalogue, each arm's config, ``--set``), ``identity`` (bench identity,
suite keys, the invocation), ``provenance`` (commit and software versions of any benchmark record), ``store``
(results files and run claims), ``stats``, ``report`` and ``run`` (the searches and the command line). The
scripts in ``benchmarks/`` import it with ``benchmarks/`` on ``sys.path`` (a script's own folder; for the tests,
pytest's ``pythonpath`` in pyproject.toml), as they import ``bench_world``.
"""
