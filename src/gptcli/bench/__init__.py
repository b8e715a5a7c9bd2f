"""`gptcli bench`: plan, run in isolation, measure, report and compare inference and training benchmarks."""
