"""References the tests and the benchmarks compare the library against; the library never imports them.

They live in the package (not under tests/) because a shipped tool, tools/bench_bank.py, times the sharded
step against the dense reference on the user's machine."""
