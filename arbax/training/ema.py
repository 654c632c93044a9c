"""(being written) ema."""

__all__: list[str] = []
