"""A tool environment in TRL's environment_factory shape: env: {factory: calculator:Calculator}."""


class Calculator:
    def __init__(self):  # one instance per trajectory, built with no arguments
        self.used = 0

    def reset(self, **row) -> str | None:  # the task's row; None keeps the task's prompt
        self.used = 0
        return None

    def multiply(self, a: int, b: int) -> int:  # every public method is a tool
        """Multiply two integers.

        Args:
            a: the first factor
            b: the second factor
        """
        self.used += 1
        return a * b

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: the first term
            b: the second term
        """
        self.used += 1
        return a + b
