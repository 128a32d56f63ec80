"""The half of the Ray backend that runs inside each actor; imports nothing of the driver's."""
