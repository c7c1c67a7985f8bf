"""The toy world: a controlled offline benchmark where SDFT vs SFT can be compared on a CPU in minutes."""
