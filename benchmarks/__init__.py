"""Benchmarks of the fused TIS-DPO loss against its peers (pytest-benchmark).

Run ``pytest benchmarks --benchmark-json=bench.json`` and then ``python -m benchmarks.report --json
bench.json`` to write ``benchmarks/results/<device>.md`` with its plots. ``pytest benchmarks
--benchmark-disable`` (what CI runs) uses tiny shapes and runs every provider once.
"""
