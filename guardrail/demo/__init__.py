"""`guardrail demo`: the whole guardrail on the shipped reference model on one machine
(`run`), and the background servers it, the tests and the benchmarks start
(`background_server`)."""
