"""bench: the benchmark machinery of esgd-bench: optimizer registry, runner, timing, results, reports."""
