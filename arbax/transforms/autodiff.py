"""(being written) autodiff."""

__all__: list[str] = []
