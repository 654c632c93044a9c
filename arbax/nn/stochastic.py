"""(being written) stochastic."""

__all__: list[str] = []
