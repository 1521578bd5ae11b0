"""A local copy of the organisers' evaluation: run an image case by case, time and sample it, score it,
report it. Host-side only (never copied into an image). `python -m flarebox_tools.evaluation --help`."""
