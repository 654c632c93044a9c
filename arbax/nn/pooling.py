"""(being written) pooling."""

__all__: list[str] = []
