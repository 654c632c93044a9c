"""(being written) embed."""

__all__: list[str] = []
