"""(being written) recurrent."""

__all__: list[str] = []
