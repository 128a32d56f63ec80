"""The driver's half of the Ray backend: actors started, chunks sent, answers and deaths seen."""
